"""The fast forms of the plain ops on CUDA: `OVERRIDES` (rule_table.py lays them over KERNELS).

Each override runs its fast form on CUDA tensors (or on
the CPU under Triton's interpreter, for tests) and falls back to the reference kernel
otherwise, so mixed placements (a `cpu` device beside `cuda:N`) still run. None of them
reads a value back to the host: no `.item()`, `nonzero`, `bincount` or `.tolist()` on the
hot path, so a decode step can be captured in a CUDA graph.

Attention and kv_append also run in *bucket* mode (`ExecContext.bucket` set): the cache is
read as its first `bucket` rows, new rows are written at device-side positions
(`ExecContext.kvpos`) and attention masks keys past each query's position on the device.
Shapes then stay fixed while the cache grows, which is what a captured decode step needs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from backends.cuda.quant import kept
from backends.cuda.reference import attention as ref_attn
from backends.cuda.reference import kv_quant
from backends.cuda.triton_kernels import decode_attention, deltanet_prefill, fused
from backends.cuda.rules import window_attention
from backends.cuda.triton_kernels import gemv
from backends.cuda.triton_kernels import deltanet as tdn
from backends.cuda.runtime.devices import torch_device, torch_dtype
from backends.cuda.triton_kernels import fast_moe, moe_router
from backends.cuda.runtime.interp import ExecContext, Kernel, Replicas
from backends.cuda.reference.kernels import KERNELS, _as_spec
from backends.cuda.reference.moe import shared_ids
from backends.cuda.reference import recurrent
from backends.cuda.reference.recurrent import CHUNK
from graphir.graph import Node
from graphir.ops import Op

Args = Sequence[torch.Tensor]


def _ref(op: Op) -> Kernel:
    return KERNELS[op]


def matmul(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, w = args
    if kept.is_kept(w):  # GGUF blocks (quant/kept.py): the quant GEMV for a decode row
        return kept.matmul(x, w, ctx.choices)
    base = getattr(w, "aligned_base", None)
    if base is not None and base.dtype == x.dtype:
        # a merged weight folded with zero rows for alignment (weights/fold.py): multiply by all of them
        y = gemv.matmul(x, base, ctx.choices) if gemv.applies(x, base) else F.linear(x, base)
        return y[..., :w.shape[0]]
    if gemv.applies(x, w):  # one row (a decode step): the measured-faster of cuBLAS and a GEMV
        return gemv.matmul(x, w, ctx.choices)
    return _ref(Op.MATMUL)(node, args, ctx)


def rms_norm(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, w = args
    if not fused.usable(x) or x.dim() > 3:
        return _ref(Op.RMS_NORM)(node, args, ctx)
    out = fused.rms_norm(x, w, float(node.attr["eps"]), float(node.attr.get("offset", 0.0)))
    return _as_spec(node, out)


def rms_norm_gated(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, z, w = args
    if not fused.usable(x) or x.dim() > 3:
        return _ref(Op.RMS_NORM_GATED)(node, args, ctx)
    return fused.rms_norm_gated(x, z, w, float(node.attr["eps"]))


def swiglu(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    g, u = args
    if not fused.usable(g) or g.dim() > 3 or g.shape != u.shape:
        return _ref(Op.SWIGLU)(node, args, ctx)
    return fused.swiglu(g, u)


def rope(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, pos = args  # x [T,heads,d], pos [T]
    if not fused.usable(x):
        return _ref(Op.ROPE)(node, args, ctx)
    a = node.attr
    params = tuple((k, a[k]) for k in ref_attn.ROPE_KEYS if k in a)
    inv = ref_attn._inv_freq_on(x.device, int(a["n_rot"]), float(a["theta"]), a.get("scaling"), params)
    return fused.rope(x, pos, inv, int(a["n_rot"]), ref_attn._attn_factor(dict(a)))


def ssm_conv(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, w = args
    if not fused.usable(x) or w.shape[1] > 4:
        return _ref(Op.SSM_CONV)(node, args, ctx)
    return fused.ssm_conv(x.to(w.dtype), w, node.attr.get("act") == "silu").to(x.dtype)


def delta_net_in_place(q: torch.Tensor, state: torch.Tensor) -> bool:
    """Whether `delta_net(..., state_out=state)` runs the token-serial kernel, which can write
    the new state over the old one."""
    return (fused.usable(q) and q.shape[0] <= CHUNK and state.dtype == torch.float32
            and state.is_contiguous())


def delta_net(node: Node, args: Args, ctx: ExecContext, state_out: torch.Tensor | None = None) -> torch.Tensor:
    q = args[0]
    if not fused.usable(q):
        return _ref(Op.DELTA_NET)(node, args, ctx)
    l2 = bool(node.attr.get("qk_l2norm", False))
    if q.shape[0] <= CHUNK:  # token-serial: raw gates are made in the kernel
        raw = (args[6], args[7]) if node.attr.get("raw_gates") else None
        return tdn.delta_net(*args[:6], l2, state_out=state_out, raw=raw)
    q, k, v, g, beta, state = recurrent.gates_of(node, args)
    return deltanet_prefill.prefill(q, k, v, g, beta, state, l2, ctx.choices)


# ---- MoE --------------------------------------------------------------------------------------

def moe_topk(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    (logits,) = args  # softmax is monotonic: the top-k of the logits are the top-k of the probabilities
    k, m = int(node.attr["k"]), int(node.attr.get("shared", 0))
    if moe_router.topk_ok(logits, k + m):
        # ids alone: a top-k whose routing weights are wanted too is a moe_topk_weights node (passes/fuse.py)
        return moe_router.topk_softmax(logits, k, m, choices=ctx.choices)[0]
    ids = torch.topk(logits, k, dim=-1).indices.to(torch.int32)
    if m:
        ids = torch.cat([ids, shared_ids(ids.shape[0], logits.shape[1], m, ids.device)], dim=1)  # [T,k+m]
    return ids


def moe_weights(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    logits, ids = args[0], args[1]
    m = int(node.attr.get("shared", 0))
    if not node.attr.get("norm"):
        return _ref(Op.MOE_WEIGHTS)(node, args, ctx)
    if m:  # k softmax weights and the shared gate's sigmoid in one launch
        if moe_router.topk_ok(logits, ids.shape[1]) and ids.shape[0] == logits.shape[0]:
            return moe_router.selected_softmax(logits, ids, args[2], m)
        return _ref(Op.MOE_WEIGHTS)(node, args, ctx)
    # softmax over all experts, renormalised over the chosen ones == softmax over the chosen logits
    if moe_router.topk_ok(logits, ids.shape[1]) and ids.shape[0] == logits.shape[0]:
        return moe_router.selected_softmax(logits, ids)
    return torch.softmax(logits.gather(1, ids.long()).to(torch.float32), dim=-1)


def moe_matmul(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    x, w, ids = args
    if not (x.is_cuda or fused.usable(x)):
        return _ref(Op.MOE_MATMUL)(node, args, ctx)
    # a prefill's matmuls of one layer share their route as a moe_route node (passes/fuse.py)
    return fast_moe.moe_matmul(x, w, ids, choices=ctx.choices)


def moe_sum(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    y, w = args  # [T,k,H], [T,k] f32
    # one launch for a decode step; a prefill's batched product is faster (measured on an H200)
    if fused.usable(y) and 0 < y.shape[0] <= 64 and y.shape[1] <= moe_router.TOPK_MAX_K:
        return moe_router.moe_sum(y, w)
    return torch.bmm(w.to(y.dtype).unsqueeze(1), y).squeeze(1)  # one batched product instead of mul + sum


# ---- attention --------------------------------------------------------------------------------

def _key_index(ctx: ExecContext, device: torch.device, n: int) -> torch.Tensor:
    key = ("keys", device, n)
    t = ctx.cache.get(key)
    if t is None:
        t = ctx.cache[key] = torch.arange(n, device=device)
    return t


def _explicit(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float,
              mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)


def _lower_right(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float, ctx: ExecContext) -> torch.Tensor:
    """Causal attention of T queries at the end of S keys (query i at S-T+i)."""
    T, S = qh.shape[2], kh.shape[2]
    dev = qh.device
    mask = _key_index(ctx, dev, S)[None, :] <= (S - T + _key_index(ctx, dev, T))[:, None]  # [T,S]
    if qh.is_cuda and qh.dtype in (torch.float16, torch.bfloat16) and qh.shape[-1] <= 256:
        ok = ctx.choices.flash_lower_right  # checked once per session against an explicit mask
        if ok is not False:
            try:
                # the flash kernel's causal flag means lower-right alignment when S > T; GQA native
                out = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, True, False,
                                                                         scale=scale)[0]
            except RuntimeError:
                ctx.choices.flash_lower_right = False
                out = None
            if out is not None:
                if ok is None:  # first use: prove it once against the explicit mask
                    ref = _explicit(qh, kh, vh, scale, mask[None, None])
                    good = bool(((out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max() + 1e-3))
                    ctx.choices.flash_lower_right = good
                    return out if good else ref
                return out
    return _explicit(qh, kh, vh, scale, mask[None, None])


def _block_cache(node: Node, args: Args, ctx: ExecContext, i: int) -> str | None:
    """The block type ("q8_0", "q4_0") of attention input i when it arrives as raw bytes, else None."""
    name = ctx.graph[node.inputs[i]].spec.dtype.name
    return name if kv_quant.is_quant(name) and args[i].dtype == torch.uint8 else None


def attention(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    """Scaled-dot-product attention over the cache (flash / efficient kernels on CUDA)."""
    if ref_attn.needs_mask(node, args):  # window / sinks: read the window only (or the reference)
        return window_attention.attention(node, args, ctx)
    q = args[0]
    scale = float(node.attr["scale"])
    if ctx.bucket is not None and q.shape[0] == 1:  # a block-quantised cache read as its bytes
        kc, vc = (_block_cache(node, args, ctx, i) for i in (1, 2))
        if (kc or vc) and decode_attention.usable_for(q, args[1], args[2], kc, vc):
            return decode_attention.decode_attention(q, args[1], args[2], ctx.kvpos[ctx.device_name(node)], scale,
                                                     k_cache=kc, v_cache=vc)
    k, v = ref_attn.cache_floats(node, args, ctx, q.dtype)  # q [T,hq,d], k [S,hkv,d], v [S,hkv,dv]
    T, hq, d = q.shape
    S, hkv, dv = v.shape
    g = hq // hkv
    kh = k.permute(1, 0, 2).unsqueeze(0)  # [1,hkv,S,d]
    vh = v.permute(1, 0, 2).unsqueeze(0)
    mask = None
    if ctx.bucket is not None:  # fixed S: keys past each query's position are masked on the device
        pos = ctx.kvpos[ctx.device_name(node)]  # [1] int64: the first query's position
        if T == 1 and decode_attention.usable_for(q, k, v):
            return decode_attention.decode_attention(q, k, v, pos, scale)  # two launches, not nine
        keys = _key_index(ctx, q.device, S)
        mask = keys[None, :] <= (pos + _key_index(ctx, q.device, T))[:, None]  # [T,S]
    if T == 1:
        # one query per head: the g query heads of a KV head are g rows of one batched product.
        # Plain batched matmuls parallelise over the S keys (a fused attention kernel gives a
        # single query one block per head and walks the whole cache with it).
        qh = q.reshape(hkv, g, d)
        scores = torch.bmm(qh, k.permute(1, 2, 0)) * scale  # [hkv,g,S]
        if mask is not None:
            scores = scores.masked_fill(~mask.view(1, 1, S), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, v.permute(1, 0, 2)).reshape(1, hq, dv)  # [hkv,g,dv] -> [1,hq,dv]
    qh = q.permute(1, 0, 2).unsqueeze(0)  # [1,hq,T,d]
    if mask is not None:
        out = _explicit(qh, kh, vh, scale, mask[None, None])
    elif S == T:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        out = _lower_right(qh, kh, vh, scale, ctx)
    return out[0].transpose(0, 1)  # [T,hq,dv]


def kv_append(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    if ctx.bucket is None:
        return _ref(Op.KV_APPEND)(node, args, ctx)
    cache, new = args  # cache: the first `bucket` rows of the preallocated buffer
    src = ctx.graph[node.inputs[0]]
    buf = ctx.buffers[src.attr["state"]]
    pos = ctx.kvpos[ctx.device_name(node)]
    idx = pos if new.shape[0] == 1 else pos + _key_index(ctx, new.device, new.shape[0])
    buf.index_copy_(0, idx, kv_quant.to_cache(new, node.spec.dtype.name, buf))
    return buf[:cache.shape[0] + new.shape[0]]  # bucket rows; KV is bound to bucket - T


# ---- placement --------------------------------------------------------------------------------

def copy(node: Node, args: Args, ctx: ExecContext) -> torch.Tensor:
    # device to device: ordered by events on both devices' streams, no host synchronisation
    return args[0].to(ctx.device(node), non_blocking=True)


def _nccl_ok(parts: Sequence[torch.Tensor], devs: Sequence[torch.device]) -> bool:
    if len(set(devs)) != len(devs) or not all(d.type == "cuda" for d in devs):
        return False
    try:
        import torch.cuda.nccl as nccl

        return bool(nccl.is_available(list(parts)))
    except (ImportError, RuntimeError):
        return False


def all_reduce(node: Node, args: Args, ctx: ExecContext) -> Replicas:
    """NCCL all-reduce (torch.cuda.nccl, one call over the group's GPUs) when every member is a
    distinct GPU; else the reference (peer copies, summed on every device)."""
    devs = [torch_device(d) for d in node.devices]
    parts_dev = [p.device for p in args]
    if ctx.choices.nccl_failed or not _nccl_ok(args, devs) or parts_dev != devs:
        return _ref(Op.ALL_REDUCE)(node, args, ctx)
    import torch.cuda.nccl as nccl

    out_dt = torch_dtype(node.spec.dtype)
    wire = torch_dtype(node.attr["dtype"]) if "dtype" in node.attr else out_dt
    users = ctx.graph.users
    bufs = []
    for name, p in zip(node.inputs, args):
        if p.dtype != wire:
            bufs.append(p.to(wire).contiguous())  # a fresh tensor: reduce it in place
        elif users.get(name) == (node.name,) and p._base is None and p.is_contiguous():
            bufs.append(p)  # nobody else reads this partial
        else:
            bufs.append(p.clone(memory_format=torch.contiguous_format))
    try:
        nccl.all_reduce(bufs)  # in place, on each device's current stream
    except RuntimeError as e:  # no usable NCCL here: peer copies from now on
        ctx.choices.nccl_failed.append(str(e).splitlines()[0] if str(e) else "RuntimeError")
        return _ref(Op.ALL_REDUCE)(node, args, ctx)
    out = Replicas()
    for name, b in zip(node.devices, bufs):
        out[name] = b if b.dtype == out_dt else b.to(out_dt)
    return out


OVERRIDES: dict[Op, Kernel] = {
    Op.MATMUL: matmul,
    Op.RMS_NORM: rms_norm,
    Op.RMS_NORM_GATED: rms_norm_gated,
    Op.SWIGLU: swiglu,
    Op.ROPE: rope,
    Op.SSM_CONV: ssm_conv,
    Op.DELTA_NET: delta_net,
    Op.MOE_TOPK: moe_topk,
    Op.MOE_WEIGHTS: moe_weights,
    Op.MOE_MATMUL: moe_matmul,
    Op.MOE_SUM: moe_sum,
    Op.ATTENTION: attention,
    Op.KV_APPEND: kv_append,
    Op.COPY: copy,
    Op.ALL_REDUCE: all_reduce,
}
