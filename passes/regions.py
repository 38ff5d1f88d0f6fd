"""Any per-region device assignment as a placed graph: the building block of `place_auto`.

A layer has two regions (REFERENCE §1): the mixer (attention or delta-net, up to
`attn_residual`) and the FFN (dense or MoE, up to `l_out`). A `RegionAssignment` gives each
region a ratio vector over the devices: a one-hot vector keeps the region whole on one device
(what layer split does with every region), a vector with two or more positive entries splits
it tensor-parallel like graph split (delta-net by key-head groups). Layer split, graph split
and every hybrid between them are points of this one space, so the search compares them on
equal terms; the rewrite itself is `passes.tp.RegionSplit`, the same code `place_graph` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from graphir.graph import Graph, Node
from graphir.models.config import ModelConfig
from graphir.ops import Op

from passes.devices import PlacementError
from passes.emit import Emitter, suffix
from passes.plan import GraphPlan, Recurrent, plan_graph
from passes.tp import RegionSplit
from passes.transfers import eliminate_dead, insert_transfers

Ratios = tuple[float, ...]


@dataclass(frozen=True)
class RegionAssignment:
    """Ratios per layer for its mixer and its FFN; devices with ratio 0 take no part."""

    mixer: tuple[tuple[int, Ratios], ...]  # (layer, ratios), in layer order
    ffn: tuple[tuple[int, Ratios], ...]
    embed: int = 0  # device index of the token embedding
    head: int = 0  # device index of the output norm and head (and of the logits)
    head_split: tuple[int, ...] = ()  # 2+ devices: the head's vocab rows split over them


def layer_of(name: str) -> int | None:
    """`blk.12.attn_q#1` -> 12 (Node.layer, without a regex: placement asks for every node)."""
    if not name.startswith("blk."):
        return None
    k = name.find(".", 4)
    return int(name[4:k]) if k > 4 and name[4:k].isdigit() else None


def sections(g: Graph) -> tuple[list[Node], list[tuple[int, list[Node]]], list[Node]]:
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


def require_unplaced(g: Graph, who: str) -> None:
    if any(n.device for n in g.nodes):
        raise PlacementError(f"{who} needs an unplaced graph; this one is already placed")


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


def check_reduce_dtype(reduce_dtype: str | None) -> None:
    if reduce_dtype not in (None, "f16", "bf16", "f32"):
        raise PlacementError(f"reduce dtype {reduce_dtype!r}: use f16, bf16 or f32")


def one_hot(n: int, j: int) -> Ratios:
    return tuple(1.0 if k == j else 0.0 for k in range(n))


def region_plan(g: Graph, cfg: ModelConfig, devices: Sequence[str], ra: RegionAssignment) -> GraphPlan:
    """Two plans from the shared planner, one pinned to the mixer ratios and one to the FFN
    ratios; each region takes its part from its own plan. Rounding debts are kept per share
    kind (heads, key heads, experts, ...), so a mixer's granules never depend on the FFNs'."""
    n = len(devices)
    base = tuple(1.0 for _ in range(n))
    for _, r in ra.mixer + ra.ffn:
        if len(r) != n or any(x < 0 for x in r) or sum(r) <= 0:
            raise PlacementError(f"place_auto: region ratios {list(r)} do not fit {n} device(s)")
    mix: Mapping[int, Sequence[float]] = {i: list(r) for i, r in ra.mixer}
    ffn: Mapping[int, Sequence[float]] = {i: list(r) for i, r in ra.ffn}
    # recurrent="split": a delta-net mixer pinned to one device is then exactly `single` there
    pm = graph_plan_for(g, cfg, devices, base, max_gpu=None, recurrent="split", pinned=mix)
    pf = graph_plan_for(g, cfg, devices, base, max_gpu=None, recurrent="split", pinned=ffn)
    layers = tuple((i, m, f) for (i, m, _), (_, _, f) in zip(pm.layers, pf.layers))
    return GraphPlan(tuple(devices), layers, ra.embed, ra.head)


RegionCache = dict[tuple[object, ...], tuple[Node, ...]]


def place_regions(g: Graph, cfg: ModelConfig, devices: Sequence[str], ra: RegionAssignment, *,
                  reduce_dtype: str | None = None, split_name: str = "auto",
                  cache: RegionCache | None = None) -> Graph:
    """Place `g` region by region as `ra` says; copies and replicas come from `insert_transfers`.

    `cache` (one per unplaced graph and device list) keeps each region's emitted nodes by its
    plan: a search places the same regions in many candidates, and a region's pieces depend
    on its own plan only (outside values keep their names)."""
    require_unplaced(g, f"place_{split_name}")
    devs = tuple(devices)
    check_reduce_dtype(reduce_dtype)
    return emit_regions(g, cfg, devs, region_plan(g, cfg, devs, ra), reduce_dtype=reduce_dtype,
                        split_name=split_name, cache=cache, head_split=ra.head_split)


def emit_regions(g: Graph, cfg: ModelConfig, devs: tuple[str, ...], plan: GraphPlan, *,
                 reduce_dtype: str | None = None, split_name: str = "auto", cache: RegionCache | None = None,
                 head_split: Sequence[int] = (), who: str = "place_auto", head_device: str | None = None) -> Graph:
    """The one emitter of placed graphs: nodes before the layers on the embedding device, each
    layer's mixer and FFN rewritten by `RegionSplit` under their plans, the head on the head
    device (or split by rows over `head_split`), then dead nodes dropped and transfers inserted."""
    pre, layers, post = sections(g)
    em = Emitter()
    for n in pre:
        em.add(n.with_(device=devs[plan.embed]))
    regions = {i: (m, f) for i, m, f in plan.layers}
    for i, ns in layers:
        k = next((pos for pos, n in enumerate(ns) if n.name == f"blk.{i}.attn_residual"), None)
        if k is None:
            raise PlacementError(f"{who}: layer {i} has no blk.{i}.attn_residual to end its mixer")
        for r, (rp, part) in enumerate(zip(regions[i], (ns[:k + 1], ns[k + 1:]))):
            key = (i, r, rp, reduce_dtype)
            if cache is not None and key in cache:
                for n in cache[key]:
                    em.add(n)
                continue
            start = len(em.nodes)
            RegionSplit(em, rp, i, devs, cfg, reduce_dtype).run(part)
            if cache is not None:
                cache[key] = tuple(em.nodes[start:])
    if len(head_split) > 1:
        _split_head(em, post, devs, head_split, plan.head)
    else:
        head = head_device or devs[plan.head]
        for n in post:
            em.add(n.with_(device=head))
    placed = eliminate_dead(em.graph(g.meta))
    out = insert_transfers(placed, devices=devs)
    return out.replace_nodes(out.nodes, split=split_name)


def _head_matmul(post: Sequence[Node]) -> int:
    """Index of the head matmul in the nodes after the layers, or -1 when the head cannot be
    split by rows: it must be the one matmul, read its own weight leaf (tied embeddings share
    the embedding's, which stays whole) and be followed by results only."""
    mm = [k for k, n in enumerate(post) if n.op == Op.MATMUL]
    if len(mm) != 1 or any(n.op != Op.OUTPUT for n in post[mm[0] + 1:]):
        return -1
    w = post[mm[0]].inputs[1]
    return mm[0] if any(n.name == w and n.op == Op.WEIGHT for n in post[:mm[0]]) else -1


def head_splittable(g: Graph) -> bool:
    return _head_matmul(sections(g)[2]) >= 0


def _split_head(em: Emitter, post: Sequence[Node], devs: Sequence[str], over: Sequence[int], head: int) -> None:
    """Vocabulary-parallel output head: the nodes before the head matmul (output norm, last-row
    slice) run on every device of `over`, each multiplies by its rows of the head weight, and
    the logits are joined on the head device (`insert_transfers` copies the other pieces)."""
    k = _head_matmul(post)
    if k < 0:
        raise PlacementError("place_auto: this head cannot split by rows (one matmul on its own weight leaf, "
                             "then results; tied embeddings stay whole)")
    mm = [post[k]]
    x, w = mm[0].inputs
    wnode = next(n for n in post[:k] if n.name == w and n.op == Op.WEIGHT)
    local: dict[str, dict[int, str]] = {}
    for n in post[:k]:
        if n is wnode:
            continue
        local[n.name] = {}
        for j in over:
            if n.op == Op.WEIGHT:
                attrs = dict(n.attr) | {"src": n.name}
                local[n.name][j] = em.leaf(suffix(n.name, j), Op.WEIGHT, n.spec, attrs, devs[j])
            else:
                ins = [local[i][j] if i in local else i for i in n.inputs]
                local[n.name][j] = em.emit(suffix(n.name, j), n.op, ins, n.attrs, devs[j])
    vocab, parts = int(wnode.spec.shape[0]), []
    for q, j in enumerate(over):
        lo, hi = vocab * q // len(over), vocab * (q + 1) // len(over)
        piece = em.leaf(suffix(w, j), Op.WEIGHT, wnode.spec.with_shape((hi - lo,) + wnode.spec.shape[1:]),
                        {"src": w, "slice_dim": 0, "start": lo, "stop": hi}, devs[j])
        parts.append(em.emit(suffix(mm[0].name, j), Op.MATMUL, [local[x][j] if x in local else x, piece],
                             mm[0].attrs, devs[j]))
    em.emit(mm[0].name, Op.CONCAT, parts, {"dim": mm[0].spec.rank - 1}, devs[head])
    for n in post[k + 1:]:
        em.add(n.with_(device=devs[head]))
