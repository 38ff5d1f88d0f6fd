"""Fast forms of the fused ops (passes/fuse.py makes them; reference/kernels.py has their reference).

Each runs one Triton kernel where its shapes allow (on CUDA tensors, or on the CPU under
Triton's interpreter) and the reference kernel otherwise, which computes the same values
from the ops it fuses. fastpath.py merges FUSED into its overrides; this module reads
fastpath's kernels through the module at call time (it is imported while fastpath loads).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from backends.cuda.triton_kernels import fast_moe, fused, moe_router
from backends.cuda.rules import fastpath
from backends.cuda.runtime.devices import torch_dtype
from backends.cuda.runtime.interp import ExecContext, Kernel
from backends.cuda.reference.kernels import KERNELS
from graphir.graph import Node
from graphir.ops import Op

Args = Sequence[torch.Tensor]


def _norm_args(node: Node) -> tuple[float, float]:
    return float(node.attr["eps"]), float(node.attr.get("offset", 0.0))


def add_rms_norm(node: Node, args: Args, ctx: ExecContext) -> Any:
    a, b, w = args  # [T,D] twice, [D]: (a + b, rms_norm(a + b)) in one launch
    if fused.usable(a) and a.dim() == 2 and a.shape == b.shape and a.dtype == b.dtype:
        return fused.add_rms_norm(a, b, w, *_norm_args(node))
    return KERNELS[Op.ADD_RMS_NORM](node, args, ctx)


def moe_sum_add_rms_norm(node: Node, args: Args, ctx: ExecContext) -> Any:
    a, y, wk, w = args  # [T,H], [T,k,H], [T,k] f32, [H]: sum, add and norm in one launch
    if fused.usable(a) and a.dim() == 2 and y.dim() == 3 and a.shape == (y.shape[0], y.shape[2]) \
            and a.dtype == y.dtype:
        return moe_router.moe_add_rms_norm(a, y, wk, w, *_norm_args(node))
    return KERNELS[Op.MOE_SUM_ADD_RMS_NORM](node, args, ctx)


def moe_topk_weights(node: Node, args: Args, ctx: ExecContext) -> Any:
    logits = args[0]  # [T,E] (and the shared gate [T,1]): ids and routing weights in one launch
    k, m = int(node.attr["k"]), int(node.attr.get("shared", 0))
    gate = args[1] if m else None
    if moe_router.topk_ok(logits, k + m) and (gate is None or gate.shape == (logits.shape[0], 1)):
        ids, wts = moe_router.topk_softmax(logits, k, m, gate, ctx.choices)
        if wts is not None:
            return ids, wts
    return KERNELS[Op.MOE_TOPK_WEIGHTS](node, args, ctx)


def cast_rms_norm_gated(node: Node, args: Args, ctx: ExecContext) -> Any:
    x, z, w = args  # x f32, rounded to the result type as the norm loads it
    if fused.usable(x) and x.dim() <= 3:
        return fused.rms_norm_gated(x, z, w, float(node.attr["eps"]), dtype=torch_dtype(str(node.attr["dtype"])))
    return KERNELS[Op.CAST_RMS_NORM_GATED](node, args, ctx)


def swiglu_moe_matmul(node: Node, args: Args, ctx: ExecContext) -> Any:
    g, u, w, ids = args  # [T,k,F] twice, [E,N,F], [T,k]: the GEMV applies swiglu as it loads
    if (fused.usable(g) and g.dim() == 3 and g.shape == u.shape and g.dtype == u.dtype
            and ids.numel() <= fast_moe.DECODE_SLOTS and ids.shape == g.shape[:2]):
        return fast_moe.moe_gemv(g, w, ids, up=u, choices=ctx.choices)
    x = fastpath.swiglu(node, [g, u], ctx)
    return fastpath.moe_matmul(node, [x, w, ids], ctx)


def ssm_conv_step(node: Node, args: Args, ctx: ExecContext) -> Any:
    state, x, w = args  # [K-1,C], [1,C], [C,K]: one kernel reads the state, shifts it and convolves
    K = w.shape[1]
    if (node.attr.get("in_place") and fused.usable(x) and 2 <= K <= 4 and state.is_contiguous()
            and x.shape == (1, w.shape[0]) and state.dtype == x.dtype == w.dtype):
        return fused.conv_step(state, x, w, node.attr.get("act") == "silu"), state
    return KERNELS[Op.SSM_CONV_STEP](node, args, ctx)


def delta_net(node: Node, args: Args, ctx: ExecContext) -> Any:
    if not node.attr.get("in_place"):
        return fastpath.delta_net(node, args, ctx)
    q, state = args[0], args[5]
    T = q.shape[0]
    if not fused.usable(q):
        return KERNELS[Op.DELTA_NET](node, args, ctx)  # the reference: in place by a copy
    if fastpath.delta_net_in_place(q, state):
        # the token-serial kernel writes the new state over the old one: no 2 MB copy, no launch
        return fastpath.delta_net(node, args, ctx, state_out=state)[:T], state
    packed = fastpath.delta_net(node, args, ctx)
    state.copy_(packed[T:])
    return packed[:T], state


def moe_route(node: Node, args: Args, ctx: ExecContext) -> Any:
    (ids,) = args  # sorted on the device, no host synchronisation (a 16-bit key where it fits)
    r = fast_moe.route(ids, int(node.attr["experts"]))
    return r.order, r.ends


def moe_matmul_routed(node: Node, args: Args, ctx: ExecContext) -> Any:
    x, w, ids, order, ends = args  # the grouped GEMM reads the layer's one route; a few slots take the GEMV
    if not (x.is_cuda or fused.usable(x)):
        return KERNELS[Op.MOE_MATMUL_ROUTED](node, args, ctx)
    return fast_moe.moe_matmul(x, w, ids, fast_moe.Route(order, ends), ctx.choices)


FUSED: dict[Op, Kernel] = {
    Op.ADD_RMS_NORM: add_rms_norm,
    Op.MOE_SUM_ADD_RMS_NORM: moe_sum_add_rms_norm,
    Op.MOE_TOPK_WEIGHTS: moe_topk_weights,
    Op.CAST_RMS_NORM_GATED: cast_rms_norm_gated,
    Op.SWIGLU_MOE_MATMUL: swiglu_moe_matmul,
    Op.SSM_CONV_STEP: ssm_conv_step,
    Op.DELTA_NET: delta_net,
    Op.MOE_ROUTE: moe_route,
    Op.MOE_MATMUL_ROUTED: moe_matmul_routed,
}
