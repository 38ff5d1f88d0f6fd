"""The two split modes of REFERENCE §1–2 as passes: `place_layer` and `place_graph`.

Both are points of the one placer over regions (passes/regions.py): layer split keeps every
region whole on its layer's device, graph split takes each region's plan from `plan_graph`.
Both end with `insert_transfers`, so their result verifies as a placed graph. Non-layer
nodes before the first layer (inputs, token embedding) go to the embedding device, those
after the last layer (output norm and head) to the head device.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from graphir.graph import Graph
from graphir.models.config import ModelConfig
from graphir.ops import Op

from passes.devices import PlacementError, parse_devices, parse_ts
from passes.plan import F32_REDUCE, LAYER_ONLY, Recurrent
from passes.regions import (RegionAssignment, check_reduce_dtype, emit_regions, graph_plan_for, one_hot,
                            place_regions, require_unplaced, sections)


def _devices(devices: Sequence[str] | str | int) -> tuple[str, ...]:
    return parse_devices(devices) if isinstance(devices, (str, int)) else tuple(devices)


def layer_devices(cfg: ModelConfig, n_devices: int, layers: Sequence[int], ts: Sequence[float],
                  layer_bytes: Mapping[int, int] | None = None) -> dict[int, int]:
    """llama.cpp's rule: layer i goes to the first device whose cumulative ratio exceeds the
    fraction of the model before i (counted in layers, or in bytes when `layer_bytes` is given)."""
    total = sum(ts)
    cum, acc = [], 0.0
    for r in ts:
        acc += r / total
        cum.append(acc)
    cum[-1] = 1.0 + 1e-9
    sizes = [layer_bytes[i] if layer_bytes else 1 for i in layers]
    whole = float(sum(sizes)) or 1.0
    out: dict[int, int] = {}
    before = 0
    for i, sz in zip(layers, sizes):
        x = before / whole
        out[i] = next(j for j in range(n_devices) if cum[j] > x + 1e-12 and ts[j] > 0)
        before += sz
    return out


def place_layer(g: Graph, cfg: ModelConfig, devices: Sequence[str] | str | int, *,
                ts: Sequence[float] | str | None = None, by_memory: bool = False, ctx: int = 4096,
                head_device: str | None = None) -> Graph:
    """Contiguous layers per device by `ts` ratios (by memory when `by_memory`: ratios then
    weigh each layer's weight, KV-cache (at `ctx` tokens) and state bytes); the output head on
    the last layer's device; the residual stream copied at each device boundary. Every region
    of a layer is whole on the layer's device: a point of `place_regions`' space."""
    require_unplaced(g, "place_layer")
    devs = _devices(devices)
    ratios = parse_ts(ts, len(devs))
    _, layers, _ = sections(g)
    idx = [i for i, _ in layers]
    sizes = None
    if by_memory:
        sizes = {i: sum(n.spec.nbytes_at({"KV": ctx, "T": 1}) for n in ns if n.op in (Op.WEIGHT, Op.STATE_IN))
                 for i, ns in layers}
    where = layer_devices(cfg, len(devs), idx, ratios, sizes)
    home = tuple((i, one_hot(len(devs), where[i])) for i in idx)
    first = where[idx[0]] if idx else 0
    last = devs.index(head_device) if head_device in devs else (where[idx[-1]] if idx else len(devs) - 1)
    out = place_regions(g, cfg, devs, RegionAssignment(home, home, first, last), split_name="layer")
    return out.replace_nodes(out.nodes, ts=",".join(f"{r:g}" for r in ratios))


def place_graph(g: Graph, cfg: ModelConfig, devices: Sequence[str] | str | int, *,
                ts: Sequence[float] | str | None = None, max_gpu: int | None = None,
                recurrent: Recurrent = "single", reduce_dtype: str | None = None,
                layer_groups: Mapping[int, Sequence[str]] | None = None, head_device: str | None = None) -> Graph:
    """Tensor-parallel split (REFERENCE §1). `layer_groups` pins chosen layers to a subset of
    the devices (e.g. delta-net layers on one device); the rest follow `ts` / `max_gpu`. The
    plan of every region comes from `plan_graph`; the regions are emitted by `emit_regions`,
    the placer `place_regions` runs."""
    require_unplaced(g, "place_graph")
    devs = _devices(devices)
    ratios = parse_ts(ts, len(devs))
    if cfg.arch in LAYER_ONLY:  # as ik_llama.cpp: graph split of this family is layer split
        return place_layer(g, cfg, devs, ts=ratios, head_device=head_device)
    if cfg.arch in F32_REDUCE and reduce_dtype in (None, "f16"):
        reduce_dtype = "f32"
    pinned = pinned_ratios(devs, ratios, layer_groups) if layer_groups else None
    check_reduce_dtype(reduce_dtype)
    plan = graph_plan_for(g, cfg, devs, ratios, max_gpu=max_gpu, recurrent=recurrent, pinned=pinned)
    out = emit_regions(g, cfg, devs, plan, reduce_dtype=reduce_dtype, split_name="graph", who="place_graph",
                       head_device=head_device)
    return out.replace_nodes(out.nodes, ts=",".join(f"{r:g}" for r in ratios))


def pinned_ratios(devs: Sequence[str], ratios: Sequence[float],
                  groups: Mapping[int, Sequence[str]]) -> dict[int, list[float]]:
    """Per-layer ratios for layers pinned to a device subset (`ts` within the subset)."""
    bad = [d for ds in groups.values() for d in ds if d not in devs]
    if bad:
        raise PlacementError(f"layer group names device {bad[0]}, which is not among {','.join(devs)}")
    out: dict[int, list[float]] = {}
    for i, ds in sorted(groups.items()):
        if not ds:
            raise PlacementError(f"layer group for layer {i} is empty")
        sub = [ratios[j] if devs[j] in ds else 0.0 for j in range(len(devs))]
        out[i] = sub if sum(sub) > 0 else [1.0 if devs[j] in ds else 0.0 for j in range(len(devs))]
    return out
