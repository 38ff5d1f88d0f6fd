"""A running model: weights loaded, state threaded through prefill and decode calls.

`Session` builds the prefill graph ("pp", T tokens) and the decode graph ("tg", T = 1) once,
applies the caller's graph passes to both (placement, merges: any `Graph -> Graph`), loads
the weights their leaves name and keeps the state between calls: KV caches preallocated for
`ctx` tokens (kv_append writes into them in place), conv and delta-net state. Every call
binds T (tokens now) and KV (tokens cached) and feeds positions KV..KV+T-1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from backends.cuda.quant.kept import summary as kept_summary
from backends.cuda.reference import kv_quant
from backends.cuda.runtime.choices import KernelChoices
from backends.cuda.runtime.devices import parse_devices, torch_device, torch_dtype
from backends.cuda.rules.rule_table import kernels_for
from backends.cuda.runtime.interp import ExecContext, Kernel, Replicas, RunStats, run_graph
from backends.cuda.weights.loader import load_folded
from backends.cuda.runtime.streams import DeviceStreams
from backends.cuda.weights.sources import DeviceRandomWeights, RandomWeights, WeightSource, reference_weights
from graphir import dims as D
from graphir.errors import GraphirError
from graphir.graph import Graph, Node, verify
from graphir.models import BuildOptions, ModelConfig, build
from graphir.models.sources import ModelSource, load_source, weight_scheme
from graphir.ops import Op, act_dtype

Pass = Callable[[Graph], Graph]


def open_weights(weights: WeightSource | str | Path | None, source: ModelSource, seed: int = 0,
                 on_device: bool = False) -> WeightSource:
    """None: the model's own weights when it holds any, else seeded random ones (drawn on the
    GPU when `on_device`); "random" (drawn on the CPU: the same values on every device type);
    a checkpoint directory or .gguf path; or any WeightSource."""
    if weights is None:
        if not source.has_weights:
            return DeviceRandomWeights(seed) if on_device else RandomWeights(seed)
        weights = source.path
    if isinstance(weights, str) and weights == "random":
        return RandomWeights(seed)
    if isinstance(weights, (str, Path)):
        p = Path(weights)
        if p.suffix == ".gguf" or (p.is_file() and _magic(p) == b"GGUF"):
            from backends.cuda.weights.gguf_weights import GGUFWeights

            return GGUFWeights(p, source.cfg, dict(source.gguf_name_map))
        if p.is_dir():
            from backends.cuda.weights.hf_checkpoint import HFCheckpoint

            return HFCheckpoint(p, source.cfg)
        raise GraphirError(f"{weights}: no such checkpoint directory or GGUF file")
    return weights


def _magic(p: Path) -> bytes:
    with p.open("rb") as f:
        return f.read(4)


def _as_source(model: ModelSource | ModelConfig | str | Path) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, ModelConfig):
        return ModelSource(model, "preset")
    return load_source(model)


def _ids(ids: Any) -> list[int]:
    if isinstance(ids, int):
        return [ids]
    if isinstance(ids, torch.Tensor):
        return [int(x) for x in ids.reshape(-1).tolist()]
    return [int(x) for x in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]


FLOAT_KV = ("f32", "f16", "bf16")


def _check_quant_cache(g: Graph, kv_type: str) -> None:
    """A block-quantised cache is read back only by attention (which dequantises it): refuse a
    model whose cache feeds other ops (the latent cache of multi-head latent attention)."""
    if not kv_quant.is_quant(kv_type):
        return
    for n in g.by_op(Op.STATE_IN):
        if n.spec.dtype.name == kv_type:
            kv_quant.stored_shape(kv_type, tuple(n.spec.shape))  # the head size must hold whole blocks
    allowed = {Op.ATTENTION, Op.OUTPUT, Op.COPY}  # OUTPUT: the cache kept for the next call
    for n in g.by_op(Op.KV_APPEND):
        bad = sorted({g[u].op.value for u in g.users[n.name]} - {o.value for o in allowed})
        if bad:
            raise GraphirError(f"KV cache type {kv_type} is executable for attention's K/V caches only; "
                               f"%{n.name} feeds {', '.join(bad)}")


class Session:
    """Execute one sequence. `prefill(ids)` -> logits [T, vocab]; `decode(ids)` -> one row per id.
    Prefill may be called several times: a prompt split over calls gives the same logits."""

    check_devices = True  # a rank of a multi-process run names devices of other machines
    check_specs = True  # compare every result with its spec (benchmarks turn it off once warmed up)

    def __init__(self, model: ModelSource | ModelConfig | str | Path, weights: WeightSource | str | Path | None = None,
                 devices: str | Sequence[str] = "cpu", ctx: int = 4096, *, dtype: str = "f32", seed: int = 0,
                 kv_type: str | None = None, transform: Pass | Iterable[Pass] | None = None,
                 kernels: Mapping[Op, Kernel] | None = None, layers: range | None = None,
                 pp_logits: str = "all", keep_quant: bool = False) -> None:
        self.source = _as_source(model)
        self.cfg = self.source.cfg
        self.devices = parse_devices(devices) if self.check_devices else tuple(
            devices.split(",") if isinstance(devices, str) else devices)
        self.act = act_dtype(dtype)
        self.kv_type = kv_type or self.act.name
        kv_quant.check_kv_type(self.kv_type, FLOAT_KV)  # a cache type the executor cannot hold: say so now
        if ctx < 1:
            raise GraphirError(f"context length must be positive, got {ctx}")
        self.ctx = int(ctx)
        self.kernels = kernels if kernels is not None else kernels_for(self.devices)
        self.choices = KernelChoices()  # what the timed fast paths choose, once per session (run metadata)
        passes = [transform] if callable(transform) else list(transform or ())
        quant = weight_scheme(self.source, None)
        self.graphs: dict[str, Graph] = {}
        for phase in ("pp", "tg"):
            opts = BuildOptions(phase=phase, act_dtype=self.act.name, quant=quant,  # type: ignore[arg-type]
                                kv_type=self.kv_type, logits=pp_logits if phase == "pp" else "all")  # type: ignore[arg-type]
            g = build(self.cfg, opts, layers)
            for p in passes:
                g = p(g)
            verify(g)
            _check_quant_cache(g, self.kv_type)
            self.graphs[phase] = g
        reference = reference_weights(self.cfg)
        on_gpu = any(d.startswith("cuda") for d in self.devices)
        self.weight_source = open_weights(weights, self.source, seed, on_device=on_gpu)
        self.weight_source.check(reference)
        if keep_quant and not hasattr(self.weight_source, "get_kept"):
            raise GraphirError(f"keep_quant needs weights from a GGUF file; {self.weight_source.label} is not one")
        # what runs: the same graphs with load-time constants (merged weights, ...) folded
        self.weights, self.executed = load_folded(self._select(self.graphs), reference, self.weight_source,
                                                  torch_dtype(self.act), self.devices[0], self.kernels, keep_quant)
        self.kept = kept_summary(self.weights)  # matmul weights held in their GGUF blocks, by type
        self.streams = DeviceStreams(self.used_devices())
        self.last_stats = RunStats()
        self.outputs: dict[str, Any] = {}  # the last call's results by key
        self.reset()
        self.streams.synchronize_all()  # weights were written on the default streams

    def _select(self, graphs: dict[str, Graph]) -> dict[str, Graph]:
        """The graphs this process executes (all of them; a rank of a multi-process run keeps its part)."""
        return graphs

    def used_devices(self) -> list[str]:
        names = dict.fromkeys(d for g in self.executed.values() for n in g.nodes for d in n.devices)
        return list(names) or [self.devices[0]]

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: empty caches, zero recurrent state."""
        with self.streams:  # on the streams that will read them: no race with the default stream
            self._reset()

    def _reset(self) -> None:
        self.n_past = 0
        self.buffers: dict[str, torch.Tensor] = {}  # growing caches, [ctx, ...]
        self.state: dict[str, torch.Tensor] = {}  # fixed-size state (conv, delta-net)
        for g in self.executed.values():
            for n in g.by_op(Op.STATE_IN):
                key = str(n.attr["state"])
                if key in self.buffers or key in self.state:
                    continue
                first, rest = n.spec.shape[0], n.spec.shape[1:]
                dev = self._device(n)
                if D.symbols(first) == ("KV",) and all(isinstance(d, int) for d in rest):
                    # [KV, ...]: a cache that grows by T rows per call, preallocated for ctx; a
                    # block-quantised one holds its raw blocks (uint8, kv_quant)
                    dt = torch_dtype(n.spec.dtype) if not kv_quant.is_quant(n.spec.dtype.name) else torch.uint8
                    if dt == torch.uint8:
                        rest = kv_quant.stored_shape(n.spec.dtype.name, tuple(rest))
                    self.buffers[key] = torch.zeros((self.ctx + D.bind(first, {"KV": 0}),) + tuple(rest),
                                                    dtype=dt, device=dev)
                elif all(isinstance(d, int) for d in n.spec.shape):
                    self.state[key] = torch.zeros(tuple(n.spec.shape), dtype=torch_dtype(n.spec.dtype), device=dev)
                else:
                    raise GraphirError(f"state %{n.name} has shape {n.spec}: only [KV,...] caches or fixed shapes")

    def _device(self, n: Node) -> torch.device:
        return torch_device(n.devices[0] if n.device else self.devices[0])

    def _feeds(self, g: Graph, ids: list[int], sym: dict[str, int]) -> dict[str, torch.Tensor]:
        feeds: dict[str, torch.Tensor] = {}
        for n in g.nodes:
            if n.op == Op.INPUT:
                role = n.attr["role"]
                if role == "tokens":
                    feeds[n.name] = torch.tensor(ids, dtype=torch.int32, device=self._device(n))
                elif role == "positions":
                    feeds[n.name] = torch.arange(sym["KV"], sym["KV"] + sym["T"], dtype=torch.int32,
                                                 device=self._device(n))
                else:
                    raise GraphirError(f"input %{n.name} has role {role!r}; the executor feeds tokens and positions")
            elif n.op == Op.STATE_IN:
                key = str(n.attr["state"])
                if key in self.buffers:
                    rows = D.bind(n.spec.shape[0], sym)
                    feeds[n.name] = self.buffers[key][:rows].to(self._device(n))
                else:
                    feeds[n.name] = self.state[key].to(self._device(n))
        return feeds

    def _run(self, phase: str, ids: list[int]) -> torch.Tensor:
        g = self.executed[phase]
        if not ids:
            raise GraphirError("no tokens to run")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise GraphirError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        if self.n_past + len(ids) > self.ctx:
            raise GraphirError(f"context of {self.ctx} tokens is full: {self.n_past} cached + {len(ids)} new")
        sym = {"T": len(ids), "KV": self.n_past}
        self.last_stats = RunStats()
        with self.streams:
            ctx = ExecContext(g, sym, self._feeds(g, ids, sym), self.weights, self.buffers, self.devices[0],
                              choices=self.choices)
            res = run_graph(g, ctx, self.kernels, self.last_stats, check=self.check_specs)
            self._store(res)
        self.outputs = res
        self.n_past += len(ids)
        if "logits" not in res:
            raise GraphirError("the graph has no logits output")
        out = res["logits"]
        return (out.on(None) if isinstance(out, Replicas) else out).to(torch.float32)

    def _store(self, res: Mapping[str, Any]) -> None:
        for key, val in res.items():
            val = val.on(None) if isinstance(val, Replicas) else val
            if key in self.buffers:
                buf, n = self.buffers[key], val.shape[0]
                if not (val.device == buf.device and val.data_ptr() == buf.data_ptr()):
                    buf[:n].copy_(val)  # kv_append could not write in place (e.g. a copied cache)
            elif key in self.state and val.data_ptr() != self.state[key].data_ptr():
                self.state[key].copy_(val)  # in place: the tensor a captured step reads stays the same

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The sequence position and fixed-size state (conv, delta-net): what `restore` puts back.
        Cache rows past the position need no saving: they are never read again."""
        with self.streams:
            return self.n_past, {k: v.clone() for k, v in self.state.items()}

    def restore(self, snap: tuple[int, dict[str, torch.Tensor]]) -> None:
        self.n_past = snap[0]
        with self.streams:
            for k, v in snap[1].items():
                self.state[k].copy_(v)

    # ---- public calls ------------------------------------------------------------------------
    def prefill(self, ids: Any) -> torch.Tensor:
        """Run prompt tokens `ids` after what is cached; logits [T, vocab] f32."""
        return self._run("pp", _ids(ids))

    def decode(self, ids: Any) -> torch.Tensor:
        """Run tokens one at a time through the decode graph; logits [len(ids), vocab] f32."""
        return torch.cat([self._run("tg", [t]) for t in _ids(ids)], dim=0)


def greedy(session: Session, prompt: Sequence[int], n_decode: int) -> tuple[torch.Tensor, list[int]]:
    """Prompt, then `n_decode` greedy steps (each feeds the argmax of the previous row).
    Returns logits [P + n_decode, vocab] f32 on the CPU and the generated ids."""
    rows = [session.prefill(list(prompt)).cpu()]
    generated: list[int] = []
    for _ in range(n_decode):
        tok = int(rows[-1][-1].argmax())
        generated.append(tok)
        rows.append(session.decode([tok]).cpu())
    return torch.cat(rows, dim=0), generated
