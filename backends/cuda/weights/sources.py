"""Weight sources and the loader that fills a graph's weight leaves.

A source answers "the full tensor of graph weight NAME" (`WeightSource.get`); what it reads
is the source's business: seeded random numbers, a transformers checkpoint (hf_checkpoint),
a GGUF file (gguf_weights). The loader (`load_weights`) walks the weight leaves of the graphs
to run and honours placement attributes on them: `src` names the full tensor a leaf is cut
from (several names joined by `+` are concatenated along dim 0, for merged weights), and
`slice_dim/start/stop` cut the leaf's piece. Every full tensor is checked against the shape the
config implies (the unplaced graph's weight table, `reference_weights`).
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, Mapping, Protocol

import torch

from backends.cuda.runtime.devices import torch_device
from graphir.errors import GraphirError
from graphir.graph import Graph, Node
from graphir.models import ModelConfig
from graphir.models.weights import WeightInfo, reference_weights  # noqa: F401 (re-exported)
from graphir.ops import Op


class WeightError(GraphirError):
    """A weight that is missing, has the wrong shape, or does not fit the config."""


class WeightSource(Protocol):
    label: str

    def check(self, infos: Mapping[str, WeightInfo]) -> None:
        """Raise WeightError (naming the tensor) for missing or unexpected tensors, before loading."""
        ...

    def get(self, info: WeightInfo) -> torch.Tensor:
        """The full tensor on the CPU in any float type, shaped `info.shape` (the loader checks)."""
        ...


class RandomWeights:
    """Deterministic random weights: each tensor seeded from crc32(seed, name), so a tensor's
    values depend on nothing else (placement, loading order or other tensors). Scaled to keep
    activations finite at any depth: matrices N(0,1)/sqrt(fan_in), norm weights near their
    neutral value (1 plain, 0 zero-centred), ssm_a negative (it holds -exp(A_log)), biases small."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.label = f"random(seed={self.seed})"

    def check(self, infos: Mapping[str, WeightInfo]) -> None:
        return None

    def get(self, info: WeightInfo) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{info.name}".encode()))
        shape = info.shape
        if info.name.endswith("ssm_a"):
            return -(0.5 + 1.5 * torch.rand(shape, generator=gen))  # decays in (-2, -0.5)
        n = torch.randn(shape, generator=gen)
        if info.norm_offset is not None:
            return (1.0 - info.norm_offset) + 0.1 * n
        if len(shape) >= 2:
            return n / math.sqrt(shape[-1])
        return 0.1 * n  # biases (attention, dt)


class DeviceRandomWeights(RandomWeights):
    """Seeded random weights drawn on the device that holds them (`get_on`), in the compute
    type: a full-size model's 160 GB appear in seconds instead of minutes on the CPU. Same
    scales as RandomWeights; the values differ from it (another generator), but each tensor
    still depends only on (seed, name), so every placement of a model sees the same weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.label = f"device-random(seed={self.seed})"

    def get_on(self, info: WeightInfo, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{self.seed}:{info.name}".encode()))
        shape = info.shape
        if info.name.endswith("ssm_a"):
            return (torch.rand(shape, generator=gen, device=device, dtype=torch.float32).mul_(-1.5).sub_(0.5)
                    ).to(dtype)
        n = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if info.norm_offset is not None:
            return n.mul_(0.1).add_(1.0 - info.norm_offset)
        return n.mul_(1.0 / math.sqrt(shape[-1]) if len(shape) >= 2 else 0.1)


def random_source(seed: int = 0, on_device: bool = False) -> RandomWeights:
    """Seeded random weights (`--random-weights`, or a preset / config.json that has none):
    drawn on the GPU that holds them when `on_device`, else on the CPU."""
    return DeviceRandomWeights(seed) if on_device else RandomWeights(seed)


def _full(source: WeightSource, reference: Mapping[str, WeightInfo], name: str, node: Node) -> torch.Tensor:
    info = reference.get(name)
    if info is None:
        raise WeightError(f"graph weight %{node.name} refers to {name}, which this model does not have")
    t = source.get(info)
    if tuple(t.shape) != info.shape:
        raise WeightError(f"{name}: {source.label} gives shape {list(t.shape)}, the config needs {list(info.shape)}")
    return t


def source_names(node: Node) -> list[str]:
    """The full tensors a weight leaf is cut from (`src`, several joined by '+')."""
    return str(node.attr.get("src", node.name)).split("+")


def assemble(node: Node, sources: list[torch.Tensor]) -> torch.Tensor:
    """The piece a weight leaf holds: its sources joined on dim 0, then its slice, shape-checked."""
    t = torch.cat(sources, dim=0) if len(sources) > 1 else sources[0]
    if "slice_dim" in node.attr:
        a = node.attr
        t = t.narrow(int(a["slice_dim"]), int(a["start"]), int(a["stop"]) - int(a["start"]))
    want = tuple(int(d) for d in node.spec.shape)
    if tuple(t.shape) != want:
        raise WeightError(f"graph weight %{node.name} wants shape {list(want)}, its source gives {list(t.shape)}")
    return t


def _piece(node: Node, source: WeightSource, reference: Mapping[str, WeightInfo],
           cache: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = source_names(node)
    for p in parts:
        if p not in cache:
            cache[p] = _full(source, reference, p, node)
    return assemble(node, [cache[p] for p in parts])


def load_weights(graphs: Iterable[Graph], reference: Mapping[str, WeightInfo], source: WeightSource,
                 dtype: torch.dtype, default_device: str = "cpu") -> dict[str, torch.Tensor]:
    """Weight leaves of `graphs` by node name, cast to `dtype` (the activation type, as
    transformers runs a model in one type) and moved to each leaf's device."""
    nodes: dict[str, Node] = {}
    for g in graphs:
        for n in g.nodes:
            if n.op == Op.WEIGHT and n.name not in nodes:
                nodes[n.name] = n
    # a full tensor is read once, kept while later leaves still cut pieces from it
    uses: dict[str, int] = {}
    for n in nodes.values():
        for p in source_names(n):
            uses[p] = uses.get(p, 0) + 1
    cache: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for n in nodes.values():
        dev = torch_device(n.devices[0] if n.device else default_device)
        out[n.name] = _piece(n, source, reference, cache).to(device=dev, dtype=dtype).contiguous()
        for p in source_names(n):
            uses[p] -= 1
            if uses[p] == 0:
                cache.pop(p, None)
    return out
