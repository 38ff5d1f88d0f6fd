"""The two split modes of REFERENCE §1–2 as passes: `place_layer` and `place_graph`.

Both take the unplaced graph and the ModelConfig and end with `insert_transfers`, so their
result verifies as a placed graph. Non-layer nodes before the first layer (inputs, token
embedding) go to the embedding device, those after the last layer (output norm and head)
to the head device.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from graphir.graph import Graph, Node
from graphir.models.config import ModelConfig
from graphir.ops import Op

from passes.devices import PlacementError, parse_devices, parse_ts
from passes.emit import Emitter
from passes.plan import F32_REDUCE, LAYER_ONLY, GraphPlan, Recurrent, plan_graph
from passes.tp import RegionSplit
from passes.transfers import eliminate_dead, insert_transfers


def layer_of(name: str) -> int | None:
    """`blk.12.attn_q#1` -> 12 (Node.layer, without a regex: placement asks for every node)."""
    if not name.startswith("blk."):
        return None
    k = name.find(".", 4)
    return int(name[4:k]) if k > 4 and name[4:k].isdigit() else None


def _sections(g: Graph) -> tuple[list[Node], list[tuple[int, list[Node]]], list[Node]]:
    """(nodes before the layers, [(layer, its nodes)], nodes after); layers must be contiguous."""
    pre: list[Node] = []
    layers: list[tuple[int, list[Node]]] = []
    post: list[Node] = []
    for n in g.nodes:
        i = layer_of(n.name)
        if i is None:
            (pre if not layers else post).append(n)
            continue
        if post:
            # a non-layer node between layers (rare: user graphs) stays with the embedding
            pre.extend(post)
            post = []
        if not layers or layers[-1][0] != i:
            if any(k == i for k, _ in layers):
                raise PlacementError(f"layer {i}'s nodes are not contiguous (see %{n.name})")
            layers.append((i, []))
        layers[-1][1].append(n)
    return pre, layers, post


def _require_unplaced(g: Graph, who: str) -> None:
    if any(n.device for n in g.nodes):
        raise PlacementError(f"{who} needs an unplaced graph; this one is already placed")


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
    the last layer's device; the residual stream copied at each device boundary."""
    _require_unplaced(g, "place_layer")
    devs = _devices(devices)
    ratios = parse_ts(ts, len(devs))
    pre, layers, post = _sections(g)
    idx = [i for i, _ in layers]
    sizes = None
    if by_memory:
        sizes = {i: sum(n.spec.nbytes_at({"KV": ctx, "T": 1}) for n in ns if n.op in (Op.WEIGHT, Op.STATE_IN))
                 for i, ns in layers}
    where = layer_devices(cfg, len(devs), idx, ratios, sizes)
    first = devs[where[idx[0]]] if idx else devs[0]
    head = head_device or (devs[where[idx[-1]]] if idx else devs[-1])
    assign: dict[str, str] = {n.name: first for n in pre}
    for i, ns in layers:
        for n in ns:
            assign[n.name] = devs[where[i]]
    assign.update({n.name: head for n in post})
    out = insert_transfers(g, assign, devices=devs)
    return out.replace_nodes(out.nodes, split="layer", ts=",".join(f"{r:g}" for r in ratios))


def graph_plan_for(g: Graph, cfg: ModelConfig, devices: Sequence[str], ts: Sequence[float], *,
                   max_gpu: int | None, recurrent: Recurrent,
                   pinned: Mapping[int, Sequence[float]] | None = None) -> GraphPlan:
    """The split plan for this graph, with granules from the weights' own storage types."""
    index = g.index

    def wtype(name: str, shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
        if name not in index:
            raise PlacementError(f"place_graph: the graph has no weight %{name}")
        return index[name].spec.dtype

    layers = sorted({i for i in (layer_of(n.name) for n in g.nodes) if i is not None})
    return plan_graph(cfg, devices, wtype, ts=ts, max_gpu=max_gpu, recurrent=recurrent, layers=layers,
                      pinned=pinned)


def place_graph(g: Graph, cfg: ModelConfig, devices: Sequence[str] | str | int, *,
                ts: Sequence[float] | str | None = None, max_gpu: int | None = None,
                recurrent: Recurrent = "single", reduce_dtype: str | None = None,
                layer_groups: Mapping[int, Sequence[str]] | None = None, head_device: str | None = None) -> Graph:
    """Tensor-parallel split (REFERENCE §1). `layer_groups` pins chosen layers to a subset of
    the devices (e.g. delta-net layers on one device); the rest follow `ts` / `max_gpu`."""
    _require_unplaced(g, "place_graph")
    devs = _devices(devices)
    ratios = parse_ts(ts, len(devs))
    if cfg.arch in LAYER_ONLY:  # as ik_llama.cpp: graph split of this family is layer split
        return place_layer(g, cfg, devs, ts=ratios, head_device=head_device)
    if cfg.arch in F32_REDUCE and reduce_dtype in (None, "f16"):
        reduce_dtype = "f32"
    if reduce_dtype not in (None, "f16", "bf16", "f32"):
        raise PlacementError(f"reduce dtype {reduce_dtype!r}: use f16, bf16 or f32")
    pinned = pinned_ratios(devs, ratios, layer_groups) if layer_groups else None
    plan = graph_plan_for(g, cfg, devs, ratios, max_gpu=max_gpu, recurrent=recurrent, pinned=pinned)
    pre, layers, post = _sections(g)
    em = Emitter()
    emb, head = devs[plan.embed], head_device or devs[plan.head]
    for n in pre:
        em.add(n.with_(device=emb))
    regions = {i: (m, f) for i, m, f in plan.layers}
    for i, ns in layers:
        k = next((pos for pos, n in enumerate(ns) if n.name == f"blk.{i}.attn_residual"), None)
        if k is None:
            raise PlacementError(f"place_graph: layer {i} has no blk.{i}.attn_residual to end its mixer")
        mixer, ffn = regions[i]
        RegionSplit(em, mixer, i, devs, cfg, reduce_dtype).run(ns[:k + 1])
        RegionSplit(em, ffn, i, devs, cfg, reduce_dtype).run(ns[k + 1:])
    for n in post:
        em.add(n.with_(device=head))
    placed = eliminate_dead(em.graph(g.meta))
    out = insert_transfers(placed, devices=devs)
    return out.replace_nodes(out.nodes, split="graph", ts=",".join(f"{r:g}" for r in ratios))


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
