"""The kernel rule table of the PyTorch executor: `KERNELS: dict[Op, Kernel]`, one per op.

A kernel takes the node, its input values (already on the node's device) and the execution
context, and returns a tensor whose shape and type are the node's spec with T and KV bound.
The same rules run on `cpu` and `cuda:N` devices: nothing here is CPU-specific.
Norms follow transformers' cast orders (see rms_norm).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from backends.cuda.quant import kept
from backends.cuda.reference.attention import attention, attn_temp, kv_append, rope
from backends.cuda.runtime.devices import torch_device, torch_dtype
from backends.cuda.runtime.interp import ExecContext, Kernel, Replicas
from backends.cuda.reference.moe import moe_matmul, moe_sum, moe_topk, moe_topk_bias, moe_topk_biased, moe_weights, moe_weights_sigmoid
from backends.cuda.reference.recurrent import delta_net, ssm_conv
from graphir.graph import Node
from graphir.ops import Op

Args = Sequence[torch.Tensor]


def _as_spec(node: Node, t: torch.Tensor) -> torch.Tensor:
    dt = torch_dtype(node.spec.dtype)
    return t if t.dtype == dt else t.to(dt)


# ---- leaves: values the session provides -------------------------------------------------

def _fed(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return ctx.feeds[node.name]


def _weight(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return ctx.weights[node.name]


# ---- dense math ---------------------------------------------------------------------------

def get_rows(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    table, ids = args  # [V,H], [n] i32
    rows = table.index_select(0, ids)
    if "scale" in node.attr:  # the constant rounded to the table's type, the product in it (transformers)
        rows = rows * torch.tensor(float(node.attr["scale"]), dtype=rows.dtype)
    return _as_spec(node, rows)


def matmul(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, w = args  # x [...,in], w [out,in] (or kept in its GGUF blocks: quant/kept.py)
    if kept.is_kept(w):
        return kept.matmul(x, w, ctx.choices)
    return F.linear(x, w.to(x.dtype))


def head_matmul(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, w = args  # [T,h,in], [h,out,in]
    return torch.einsum("thi,hoi->tho", x, w.to(x.dtype))  # [T,h,out]


def rms_norm(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * (w + offset), normalised in f32.
    offset 0 (LlamaRMSNorm): cast the normalised x back to x's type, then multiply by w.
    offset 1 (Qwen3NextRMSNorm): multiply by (1 + w) in f32, then cast."""
    x, w = args
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + float(node.attr["eps"]))
    offset = float(node.attr.get("offset", 0.0))
    if offset:
        return (y * (offset + w.to(torch.float32))).to(x.dtype)
    return _as_spec(node, w * y.to(x.dtype))


def rms_norm_plain(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    """Gemma 4's value norm: x * rsqrt(mean(x^2) + eps) in f32, no weight, cast back."""
    x32 = args[0].to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + float(node.attr["eps"]))).to(args[0].dtype)


def rms_norm_gated(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    """Qwen3NextRMSNormGated: w * norm(x) in x's type, times silu(z) in f32, cast back."""
    x, z, w = args
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + float(node.attr["eps"]))
    y = w * y.to(x.dtype)
    return (y * F.silu(z.to(torch.float32))).to(x.dtype)


def add(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return _as_spec(node, args[0] + args[1])


def mul(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return _as_spec(node, args[0] * args[1])


def swiglu(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    g, u = args
    return F.silu(g) * u


def swiglu_oai(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU (GptOssExperts._apply_gate): gate clamped above at `limit`, up
    to [-limit, limit]; gate * sigmoid(alpha * gate) * (up + 1)."""
    g, u = args
    limit, alpha = float(node.attr["limit"]), float(node.attr["alpha"])
    g = g.clamp(max=limit)
    return g * torch.sigmoid(g * alpha) * (u.clamp(-limit, limit) + 1)


def geglu(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    g, u = args
    return F.gelu(g, approximate="tanh") * u


def softcap(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    cap = float(node.attr["cap"])
    return torch.tanh(args[0] / cap) * cap


def add_id(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    y, b, ids = args  # [T,k,N], [E,N], [T,k] i32: each slot's expert bias
    return y + b.to(y.dtype)[ids.long()]


def cast(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return _as_spec(node, args[0])


# ---- views and shape ops --------------------------------------------------------------------

def reshape(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return args[0].reshape(ctx.shape(node))  # a view when the layout allows, else a copy


def slice_(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    a = node.attr
    start, stop = ctx.bind(a["start"]), ctx.bind(a["stop"])
    return args[0].narrow(int(a["dim"]), start, stop - start)


def concat(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    # the first input's executed type, not the spec's: a concat of weights (a merged QKV) has
    # the storage type in its spec while the weights are held in the compute type
    dt = args[0].dtype
    return torch.cat([t.to(dt) for t in args], dim=int(node.attr["dim"]))


# ---- placement --------------------------------------------------------------------------------

def copy(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return args[0].to(ctx.device(node), non_blocking=False)


def all_reduce(node: Node, args: Args, ctx: ExecContext) -> Replicas:
    """Sum of one partial per device, present on every device of the group. Partials travel
    in the `dtype` attribute's type when given (reduced-precision transfers); the sum is
    accumulated in f32 in input order on every device, so all replicas are identical."""
    out_dt = torch_dtype(node.spec.dtype)
    wire = torch_dtype(node.attr["dtype"]) if "dtype" in node.attr else out_dt
    done: dict[torch.device, torch.Tensor] = {}
    out = Replicas()
    for name in node.devices:
        dev = torch_device(name)
        if dev not in done:  # logical CPU devices share one torch device: sum once
            acc = torch.zeros(args[0].shape, dtype=torch.float32, device=dev)
            for p in args:
                acc += p.to(wire).to(dev, torch.float32)
            done[dev] = acc.to(out_dt)
        out[name] = done[dev]
    return out


def output(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return args[0]


# ---- fused ops (passes/fuse.py): the values of the nodes each one replaces -------------------
# A kernel of an op with several results returns a tuple; `result` views pick from it.

def result(node: Node, args: Sequence[tuple[torch.Tensor, ...]], ctx: ExecContext) -> torch.Tensor:
    return args[0][int(node.attr["index"])]


def _as(node: Node, op: Op, attrs: dict | None = None, k: int = 0) -> Node:
    """The node as one of the ops it fuses (its attributes, its k-th result's spec), for their kernels."""
    return Node(node.name, op, node.inputs, node.results[k], node.attrs if attrs is None else attrs, node.device)


def add_rms_norm(node: Node, args: Args, ctx: ExecContext) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, w = args  # [T,D] twice, [D]
    s = _as_spec(node, a + b)
    return s, rms_norm(_as(node, Op.RMS_NORM, k=1), [s, w], ctx)


def moe_sum_add_rms_norm(node: Node, args: Args, ctx: ExecContext) -> tuple[torch.Tensor, torch.Tensor]:
    a, y, wk, w = args  # [T,H], [T,k,H], [T,k] f32, [H]
    s = _as_spec(node, a + moe_sum(node, [y, wk], ctx))
    return s, rms_norm(_as(node, Op.RMS_NORM, k=1), [s, w], ctx)


def moe_topk_weights(node: Node, args: Args, ctx: ExecContext) -> tuple[torch.Tensor, torch.Tensor]:
    logits = args[0]  # [T,E] (and the shared gate [T,1] with shared=m)
    ids = moe_topk(node, args[:1], ctx)  # [T,k(+m)]
    wts = moe_weights(_as(node, Op.MOE_WEIGHTS, {"norm": True, "shared": node.attr.get("shared")}, 1),
                      [logits, ids, *args[1:]], ctx)
    return ids, wts


def cast_rms_norm_gated(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, z, w = args  # x wider than the result type: rounded to it first
    return rms_norm_gated(node, [x.to(torch_dtype(node.attr["dtype"])), z, w], ctx)


def swiglu_moe_matmul(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    g, u, w, ids = args  # [T,k,F] twice, [E,N,F], [T,k]
    return moe_matmul(node, [F.silu(g) * u, w, ids], ctx)


def ssm_conv_step(node: Node, args: Args, ctx: ExecContext) -> tuple[torch.Tensor, torch.Tensor]:
    state, x, w = args  # [K-1,C], [T,C], [C,K]
    joined = torch.cat([state, x.to(state.dtype)], dim=0)  # [K-1+T,C]
    y = ssm_conv(node, [joined, w], ctx)
    nxt = joined[x.shape[0]:]
    if node.attr.get("in_place"):
        state.copy_(nxt)  # the next state in the state's own memory
        nxt = state
    return y, nxt


def moe_route(node: Node, args: Args, ctx: ExecContext) -> tuple[torch.Tensor, torch.Tensor]:
    (ids,) = args  # [T,k] -> slots sorted by expert (stable) i64 [T*k], where each group ends i32 [E]
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    experts = torch.arange(int(node.attr["experts"]), dtype=flat.dtype, device=flat.device)
    return order, torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)


def moe_matmul_routed(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    return moe_matmul(node, args[:3], ctx)  # the route only saves a sort: the values are the ids'


def delta_net_(node: Node, args: Args, ctx: ExecContext) -> Any:
    packed = delta_net(node, args, ctx)  # [T+dk,nv,dv] f32
    if not node.attr.get("in_place"):
        return packed
    T, state = args[0].shape[0], args[5]
    state.copy_(packed[T:])  # in_place: the new state over the old; the output rows apart
    return packed[:T], state


KERNELS: dict[Op, Kernel] = {
    Op.INPUT: _fed,
    Op.WEIGHT: _weight,
    Op.STATE_IN: _fed,
    Op.GET_ROWS: get_rows,
    Op.MATMUL: matmul,
    Op.MOE_MATMUL: moe_matmul,
    Op.RMS_NORM: rms_norm,
    Op.RMS_NORM_GATED: rms_norm_gated,
    Op.RMS_NORM_PLAIN: rms_norm_plain,
    Op.ADD: add,
    Op.MUL: mul,
    Op.SILU: lambda n, a, c: F.silu(a[0]),
    Op.SIGMOID: lambda n, a, c: torch.sigmoid(a[0]),
    Op.SOFTPLUS: lambda n, a, c: F.softplus(a[0]),
    Op.SWIGLU: swiglu,
    Op.SWIGLU_OAI: swiglu_oai,
    Op.GEGLU: geglu,
    Op.SOFTCAP: softcap,
    Op.CAST: cast,
    Op.ROPE: rope,
    Op.ATTN_TEMP: attn_temp,
    Op.ATTENTION: attention,
    Op.KV_APPEND: kv_append,
    Op.CONCAT: concat,
    Op.SSM_CONV: ssm_conv,
    Op.DELTA_NET: delta_net_,
    Op.MOE_TOPK: moe_topk,
    Op.MOE_TOPK_BIAS: moe_topk_bias,
    Op.MOE_WEIGHTS: moe_weights,
    Op.MOE_SUM: moe_sum,
    Op.MOE_TOPK_BIASED: moe_topk_biased,
    Op.HEAD_MATMUL: head_matmul,
    Op.MOE_WEIGHTS_SIGMOID: moe_weights_sigmoid,
    Op.ADD_ID: add_id,
    Op.RESHAPE: reshape,
    Op.SLICE: slice_,
    Op.COPY: copy,
    Op.ALL_REDUCE: all_reduce,
    Op.OUTPUT: output,
    Op.RESULT: result,
    Op.ADD_RMS_NORM: add_rms_norm,
    Op.MOE_SUM_ADD_RMS_NORM: moe_sum_add_rms_norm,
    Op.MOE_TOPK_WEIGHTS: moe_topk_weights,
    Op.CAST_RMS_NORM_GATED: cast_rms_norm_gated,
    Op.SWIGLU_MOE_MATMUL: swiglu_moe_matmul,
    Op.SSM_CONV_STEP: ssm_conv_step,
    Op.MOE_ROUTE: moe_route,
    Op.MOE_MATMUL_ROUTED: moe_matmul_routed,
}
