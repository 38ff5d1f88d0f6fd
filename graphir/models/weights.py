"""The weight table a config implies: every weight leaf of the unplaced graph, with its shape
and norm role. One walk for every reader and writer of weights (the CUDA loader checks
checkpoints against it, the GGUF writer writes it)."""

from __future__ import annotations

from dataclasses import dataclass

from graphir.models import BuildOptions, ModelConfig, build
from graphir.ops import Op


@dataclass(frozen=True)
class WeightInfo:
    name: str  # graph name of the full tensor: blk.3.attn_q.weight
    shape: tuple[int, ...]  # its shape under the config, torch order ([out, in])
    norm_offset: float | None = None  # set for rms-norm weights: 0 plain, 1 zero-centred (w + 1)


def reference_weights(cfg: ModelConfig) -> dict[str, WeightInfo]:
    """Every weight the config implies, in graph order (from the unplaced graph)."""
    g = build(cfg, BuildOptions(phase="pp"))
    offsets: dict[str, float] = {}
    for n in g.nodes:
        if n.op == Op.RMS_NORM:
            offsets[n.inputs[-1]] = float(n.attr.get("offset", 0.0))
        elif n.op == Op.RMS_NORM_GATED:
            offsets[n.inputs[-1]] = 0.0
    return {n.name: WeightInfo(n.name, tuple(int(d) for d in n.spec.shape), offsets.get(n.name))
            for n in g.nodes if n.op == Op.WEIGHT}
