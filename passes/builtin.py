"""The built-in passes, registered by name with their options read from the PassContext."""

from __future__ import annotations

from typing import Literal, cast

from graphir.graph import Graph

from passes.registry import PassContext, register_pass
from passes.memory import check_fit, plan_memory
from passes import fuse as _fuse
from passes.gates import fuse_delta_net_gates as _fuse_delta_net_gates
from passes.heads import contiguous_heads as _contiguous_heads
from passes.merge import merge_qkv as _merge_qkv
from passes.merge import merge_siblings as _merge_siblings
from passes.merge import merge_up_gate as _merge_up_gate
from passes.place import place_graph as _place_graph
from passes.place import place_layer as _place_layer
from passes.shared_expert import fold_shared_expert as _fold_shared_expert
from passes.transfers import eliminate_dead, insert_transfers as _insert_transfers

Recurrent = Literal["single", "split"]


@register_pass("merge_qkv")
def merge_qkv(g: Graph, ctx: PassContext) -> Graph:
    """Q, K, V projections as one matmul on a concat of their weights (per device after a split)."""
    return _merge_qkv(g)


@register_pass("merge_up_gate")
def merge_up_gate(g: Graph, ctx: PassContext) -> Graph:
    """Gate and up projections (dense, shared expert, routed experts) as one matmul."""
    return _merge_up_gate(g)


@register_pass("merge_siblings")
def merge_siblings(g: Graph, ctx: PassContext) -> Graph:
    """Delta-net in/ba projections; router + shared-expert gate, up and gate-inp: one matmul each."""
    return _merge_siblings(g)


@register_pass("contiguous_heads")
def contiguous_heads(g: Graph, ctx: PassContext) -> Graph:
    """Projection weight rows reordered so per-head pieces of the product are views (after merges)."""
    return _contiguous_heads(g)


@register_pass("fuse_delta_net_gates")
def fuse_delta_net_gates(g: Graph, ctx: PassContext) -> Graph:
    """Delta-net decay/write gates (cast, add, softplus, mul, sigmoid) made inside the delta_net."""
    return _fuse_delta_net_gates(g)


@register_pass("fold_shared_expert")
def fold_shared_expert(g: Graph, ctx: PassContext) -> Graph:
    """Sigmoid-gated shared expert as m = S/N extra routed-expert slots (run before the merges)."""
    return _fold_shared_expert(g)


@register_pass("place_layer")
def place_layer(g: Graph, ctx: PassContext) -> Graph:
    """Layer split: contiguous layers per device by --ts (else by --mem), head on the last."""
    cfg = ctx.require_cfg("place_layer")
    ts = ctx.ts if ctx.ts is not None else (tuple(float(m) for m in ctx.mem) if ctx.mem else None)
    return _place_layer(g, cfg, ctx.devices, ts=ts, by_memory=ctx.ts is None and ctx.mem is not None,
                        ctx=ctx.ctx_len)


@register_pass("place_graph")
def place_graph(g: Graph, ctx: PassContext) -> Graph:
    """Graph (tensor-parallel) split: heads / intermediate granules per device, two all-reduces a layer."""
    cfg = ctx.require_cfg("place_graph")
    ts = ctx.ts if ctx.ts is not None else (tuple(float(m) for m in ctx.mem) if ctx.mem else None)
    return _place_graph(g, cfg, ctx.devices, ts=ts, max_gpu=ctx.max_gpu,
                        recurrent=cast(Recurrent, ctx.recurrent), reduce_dtype=ctx.reduce_dtype)


@register_pass("insert_transfers")
def insert_transfers(g: Graph, ctx: PassContext) -> Graph:
    """Copies for every cross-device read; unplaced nodes inherit a device (else the first)."""
    return _insert_transfers(g, default=ctx.devices[0], devices=ctx.devices)


@register_pass("dce")
def dce(g: Graph, ctx: PassContext) -> Graph:
    """Drop nodes no graph result depends on."""
    return eliminate_dead(g)


@register_pass("check_memory")
def check_memory(g: Graph, ctx: PassContext) -> Graph:
    """Refuse a placement that does not fit --mem (weights, KV at --ctx, state, compute)."""
    if ctx.mem is not None:
        check_fit(plan_memory(g, ctx.ctx_len, ctx.ubatch), ctx.mem)
    return g


# ---- kernel fusions (passes/fuse.py): decode-only ones leave a prefill graph as it is --------

for _name in _fuse.FUSIONS:
    register_pass(_name)(getattr(_fuse, _name))
