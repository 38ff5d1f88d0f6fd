"""Reference placement for the cost model: split modes `layer` and `graph` as ik_llama.cpp does.

The project's placement passes live in `passes/`; `place()` uses them when they exist
(`passes.place_layer` / `passes.place_graph`) and otherwise this module, so predictions work
before and after they land. The result honours the placed-graph contract: every node has a
device, cross-device values flow only through `copy` nodes (on the destination) and
`all_reduce` nodes (one partial per device), split pieces carry a `#k` suffix and sliced
weights carry src/slice_dim/start/stop.

How: rather than rewriting reshape attributes of an unplaced graph, each block (attention,
delta-net, FFN, MoE) is lowered again per device with a sub-config that owns that device's
share of heads or intermediate granules, by the same builder functions the models use. Values
move on demand: reading a value on a device it is not on inserts one copy (memoised).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from graphir.builder import Builder
from graphir.dtypes import dtype
from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from graphir.models import qwen3_next
from graphir.models.common import BARE, Ctx, attention, embed, ffn, head, moe
from graphir.ops import Op
from graphir.spec import TensorSpec

Split = Literal["layer", "graph"]


class PlacementError(GraphirError):
    """A placement that cannot be honoured (bad ratios, too few devices)."""


@dataclass(frozen=True)
class PlaceOptions:
    split: Split
    devices: tuple[str, ...]
    ts: tuple[float, ...] | None = None  # split ratios per device (default equal)
    max_gpu: int | None = None  # graph split: at most this many devices per layer
    recurrent: Literal["single", "split"] = "single"  # graph split of delta-net layers


def ratios(po: PlaceOptions) -> tuple[float, ...]:
    ts = po.ts or tuple(1.0 for _ in po.devices)
    if len(ts) != len(po.devices) or any(r < 0 for r in ts) or sum(ts) <= 0:
        raise PlacementError(f"--ts needs {len(po.devices)} non-negative ratios, got {list(ts)}")
    return tuple(r / sum(ts) for r in ts)


def partition(units: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Whole units per device by largest remainder: [(start, stop)], possibly empty ranges."""
    total = sum(weights)
    exact = [units * w / total for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: units - sum(counts)]:
        counts[i] += 1
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def layer_devices(n_layer: int, shares: Sequence[float], items: Sequence[Any]) -> list[Any]:
    """llama.cpp's layer assignment: layer i goes to the first item whose cumulative share > i/n."""
    cum, acc = [], 0.0
    for s in shares:
        acc += s
        cum.append(acc)
    return [items[next((d for d, c in enumerate(cum) if i / n_layer < c - 1e-12), len(items) - 1)]
            for i in range(n_layer)]


class _Placer:
    def __init__(self, cfg: ModelConfig, opts: BuildOptions, po: PlaceOptions) -> None:
        self.cfg, self.opts, self.po = cfg, opts, po
        self.full = build(cfg, opts)  # storage types and full shapes of every weight and state
        self.b = Builder()
        self.copies: dict[tuple[str, str], str] = {}

    def index(self, dev: str) -> int:
        return self.po.devices.index(dev)

    def need(self, name: str, dev: str) -> str:
        """`name` readable on `dev`: itself, or a replica leaf, or a (memoised) copy."""
        node = self.b.node(name)
        if dev in node.devices:
            return name
        key = (name, dev)
        if key not in self.copies:
            k = self.index(dev)
            if node.op in (Op.INPUT, Op.WEIGHT):  # leaves are replicated, never copied
                attrs = dict(node.attrs) | ({"src": name} if node.op == Op.WEIGHT else {})
                self.copies[key] = self.b.leaf(node.op, f"{name}#{k}", node.spec, device=dev, **attrs)
            else:
                self.copies[key] = self.b.emit(Op.COPY, f"{name}.copy{k}", name, device=dev)
        return self.copies[key]


class _PieceCtx(Ctx):
    """A Ctx that emits one device's piece of a block into the placer's shared builder."""

    def __init__(self, pl: _Placer, cfg: ModelConfig, dev: str, suffix: str,
                 units: tuple[int, int, int] = (0, 1, 1)) -> None:
        # Ctx.__init__ would make a fresh Builder; the pieces share the placer's
        self.cfg, self.opts, self.b, self.act = cfg, pl.opts, pl.b, dtype(pl.opts.act_dtype)
        self.T = "T" if pl.opts.phase == "pp" else 1
        self.pl, self.dev, self.suffix, self.units = pl, dev, suffix, units

    def _slice_attrs(self, name: str, shape: tuple[Any, ...]) -> dict[str, Any]:
        full = self.pl.full[name].spec.shape
        diff = [j for j, (a, b) in enumerate(zip(full, shape)) if a != b]
        if not self.suffix:
            return {}
        if len(diff) != 1 or not isinstance(full[diff[0]], int):
            return {"src": name}  # a replica, or a piece that is not one contiguous range
        j, (u0, u1, n) = diff[0], self.units
        return {"src": name, "slice_dim": j, "start": full[j] * u0 // n, "stop": full[j] * u1 // n}

    def w(self, name: str, *shape: int) -> str:
        full = name if name.endswith((".weight", ".bias")) or name.endswith(BARE) else name + ".weight"
        dt = self.pl.full[full].spec.dtype  # pieces keep the file's type (granules = quant blocks)
        return self.b.leaf(Op.WEIGHT, full + self.suffix, TensorSpec(shape, dt), device=self.dev,
                           **self._slice_attrs(full, shape))

    def op(self, op: Op, name: str, *inputs: str, **attrs: object) -> str:
        ins = [self.pl.need(i, self.dev) for i in inputs]
        return self.b.emit(op, name + self.suffix, *ins, device=self.dev, **attrs)

    def view(self, name: str, x: str, *shape: object) -> str:
        return self.op(Op.RESHAPE, name, x, shape=tuple(shape))

    def cut(self, name: str, x: str, axis: int, start: object, stop: object) -> str:
        return self.op(Op.SLICE, name, x, dim=axis, start=start, stop=stop)

    def state(self, name: str, shape: tuple[object, ...], dt: Any) -> str:
        attrs = self._slice_attrs(name, tuple(shape))
        return self.b.leaf(Op.STATE_IN, name + self.suffix, TensorSpec(shape, dt), device=self.dev,
                           state=name + self.suffix, **attrs)

    def result(self, key: str, x: str) -> str:
        return self.op(Op.OUTPUT, f"{key}.out", x, key=key + self.suffix)


Piece = tuple[str, int, int]  # device, first unit, end unit


def _pieces(pl: _Placer, units: int, group: Sequence[str], split: bool) -> tuple[list[Piece], int]:
    if not split or len(group) == 1:
        return [(group[0], 0, units)], units
    share = [ratios(pl.po)[pl.index(d)] for d in group]
    return [(d, a, b) for d, (a, b) in zip(group, partition(units, share)) if b > a], units


def _block(pl: _Placer, i: int, x: str, pieces: list[Piece], units: int,
           sub: Callable[[int], dict[str, Any]], norm: str, offset: float,
           body: Callable[[Ctx, str], str], out: str) -> str:
    """norm -> body per piece; partial results summed by an all-reduce (residual on piece 0)."""
    p = f"blk.{i}."
    parts: list[tuple[str, str]] = []
    for k, (dev, u0, u1) in enumerate(pieces):
        cfg = pl.cfg if u1 - u0 == units else pl.cfg.model_copy(update=sub(u1 - u0))
        c = _PieceCtx(pl, cfg, dev, "" if len(pieces) == 1 else f"#{k}", (u0, u1, units))
        parts.append((dev, body(c, c.norm(p + norm, x, offset))))
    dev0 = parts[0][0]
    if len(parts) == 1:
        return pl.b.emit(Op.ADD, p + out, pl.need(x, dev0), parts[0][1], device=dev0)
    first = pl.b.emit(Op.ADD, f"{p}{out}#0", pl.need(x, dev0), parts[0][1], device=dev0)
    return pl.b.emit(Op.ALL_REDUCE, p + out, first, *(v for _, v in parts[1:]),
                     device=",".join(d for d, _ in parts))


def _granule(pl: _Placer, weight: str) -> int:
    """Split granularity of an FFN: max(16, quant block of the down projection's rows)."""
    return max(16, pl.full[weight].spec.dtype.block_size)


def _layer(pl: _Placer, i: int, x: str, group: Sequence[str]) -> str:
    cfg, graph_split, p = pl.cfg, pl.po.split == "graph", f"blk.{i}."
    nxt = cfg.arch == "qwen3_next"
    off = 1.0 if nxt else 0.0
    if cfg.is_recurrent(i):
        nk, r = cfg.linear_num_key_heads, cfg.linear_num_value_heads // cfg.linear_num_key_heads
        pcs, n = _pieces(pl, nk, group, graph_split and pl.po.recurrent == "split")
        x = _block(pl, i, x, pcs, n, lambda u: {"linear_num_key_heads": u, "linear_num_value_heads": u * r},
                   "attn_norm", off, lambda c, h: qwen3_next.delta_net(c, i, h), "attn_residual")
    else:
        g = cfg.gqa
        pcs, n = _pieces(pl, cfg.n_kv_head, group, graph_split)
        x = _block(pl, i, x, pcs, n, lambda u: {"n_head": u * g, "n_kv_head": u}, "attn_norm", off,
                   lambda c, h: attention(c, i, h, qk_norm=cfg.arch != "llama", gated=nxt, norm_offset=off),
                   "attn_residual")
    norm = "post_attention_norm" if nxt else "ffn_norm"
    if cfg.is_moe_layer(i):
        gran = _granule(pl, p + "ffn_down_exps.weight")
        units = max(1, cfg.moe_intermediate_size // gran)
        pcs, n = _pieces(pl, units, group, graph_split)
        ne, ns = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        sub = lambda u: {"moe_intermediate_size": ne * u // units, "shared_expert_intermediate_size": ns * u // units}
        return _block(pl, i, x, pcs, n, sub, norm, off, lambda c, h: moe(c, i, h), "l_out")
    gran = _granule(pl, p + "ffn_down.weight")
    units = max(1, cfg.intermediate_size // gran)
    pcs, n = _pieces(pl, units, group, graph_split)
    return _block(pl, i, x, pcs, n, lambda u: {"intermediate_size": u * gran}, norm, off,
                  lambda c, h: ffn(c, p, h, c.cfg.intermediate_size), "l_out")


def _groups(po: PlaceOptions, n_layer: int) -> list[tuple[str, ...]]:
    devs, share = po.devices, ratios(po)
    if po.split == "layer":
        active = [d for d, s in zip(devs, share) if s > 0]
        return [(d,) for d in layer_devices(n_layer, [s for s in share if s > 0], active)]
    size = min(po.max_gpu or len(devs), len(devs))
    blocks = [tuple(devs[j:j + size]) for j in range(0, len(devs), size)]
    weights = [sum(share[devs.index(d)] for d in b) for b in blocks]
    return layer_devices(n_layer, weights, blocks)


def place_reference(cfg: ModelConfig, opts: BuildOptions, po: PlaceOptions) -> Graph:
    """The placed graph of `cfg` for one phase under split mode `po.split`."""
    if not po.devices:
        raise PlacementError("no devices to place on")
    if po.split not in ("layer", "graph"):
        raise PlacementError(f"unknown split mode {po.split!r} (layer, graph)")
    pl = _Placer(cfg, opts, po)
    groups = _groups(po, cfg.n_layer)
    pl.b.device = groups[0][0]  # embed() makes its input leaves through the builder directly
    x = embed(_PieceCtx(pl, cfg, groups[0][0], ""))
    pl.b.device = None
    for i in range(cfg.n_layer):
        x = _layer(pl, i, x, groups[i])
    head_dev = po.devices[len(po.devices) - 1] if po.split == "layer" else groups[-1][0]
    head(_PieceCtx(pl, cfg, head_dev, ""), x)
    return pl.b.graph(**dict(pl.full.meta), split=po.split, devices=",".join(po.devices))


def _passes_placer(split: str) -> Callable[..., Graph] | None:
    try:
        mod = importlib.import_module("passes")
    except ImportError:
        return None
    fn = getattr(mod, f"place_{split}", None)
    return fn if callable(fn) else None


def place(cfg: ModelConfig, opts: BuildOptions, po: PlaceOptions) -> Graph:
    """Place with the project's passes when they provide `place_<split>`, else the reference."""
    fn = _passes_placer(po.split)
    if fn is None:
        return place_reference(cfg, opts, po)
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {}
    if "ts" in params and po.ts is not None:
        kw["ts"] = po.ts
    if "max_gpu" in params and po.max_gpu is not None:
        kw["max_gpu"] = po.max_gpu
    if "recurrent" in params:
        kw["recurrent"] = po.recurrent
    return fn(build(cfg, opts), cfg, po.devices, **kw)
