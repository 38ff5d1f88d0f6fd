"""The router's small ops and the weighted sum of the experts (CUDA fast paths of moe_topk,
moe_weights, moe_sum and their fusions): one launch each, no host synchronisation.

One Triton program per token row picks the top k logits (k rounds of max/argmax over the row
held in registers) and the softmax over the chosen logits (the `norm` routing weights) in the
same launch; `moe_sum` is one launch too, and `moe_add_rms_norm` adds the residual and
normalises for the next layer in the same one. A folded shared expert (`shared` = m slots,
passes/shared_expert.py) is m more experts E..E+m-1 to every kernel here: the top-k kernel
writes their ids in the same launch, and the selected-softmax kernel their weights (the
sigmoid of the shared gate) beside the k routed ones. The expert matmuls are in fast_moe.py.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.cuda.runtime.choices import KernelChoices, or_fresh
from backends.cuda.triton_kernels.fused import on, tl, triton, usable

TOPK_MAX_E = 4096  # widest router row the top-k kernel holds in registers
TOPK_MAX_K = 64


if triton is not None:
    from backends.cuda.triton_kernels.fused import norm_row  # a jit helper the layer-end kernel calls

    @triton.jit
    def _topk_k(l_ptr, ids_ptr, w_ptr, g_ptr, E, sl, sg, K: tl.constexpr, M: tl.constexpr, KP: tl.constexpr,
                BE: tl.constexpr, GATE: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.arange(0, BE)
        v = tl.load(l_ptr + t * sl + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
        slot = tl.arange(0, KP)
        top_v = tl.full([KP], float("-inf"), tl.float32)
        top_i = tl.zeros([KP], dtype=tl.int32)
        for j in tl.static_range(K):
            # the largest left (lowest index first on ties), then knocked out for the next round
            m, i = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
            top_v = tl.where(slot == j, m, top_v)
            top_i = tl.where(slot == j, i, top_i)
            v = tl.where(offs == i, float("-inf"), v)
        ks = slot < K
        # M shared-expert slots follow the K routed ones: ids E..E+M-1 (row stride K+M)
        top_i = tl.where(ks, top_i, E + slot - K)
        tl.store(ids_ptr + t * (K + M) + slot, top_i, mask=slot < K + M)
        if M == 0 or GATE:  # shared slots need the shared gate (GATE: given; else moe_weights reads it)
            # softmax over the chosen logits (top_v[0] is their maximum; unused slots give exp(-inf) = 0)
            p = tl.exp(top_v - tl.max(top_v, axis=0))
            w = p / tl.sum(p, axis=0)
            if M > 0:  # the shared slots: as _sel_softmax_k computes them
                g = tl.load(g_ptr + t * sg).to(tl.float32)
                sig = (1.0 / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)
                w = tl.where(ks, w, sig)
            tl.store(w_ptr + t * (K + M) + slot, w, mask=slot < K + M)

    @triton.jit
    def _sel_softmax_k(l_ptr, ids_ptr, g_ptr, w_ptr, sl, sg, K: tl.constexpr, M: tl.constexpr,
                       KP: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.arange(0, KP)
        ks = slot < K
        e = tl.load(ids_ptr + t * (K + M) + slot, mask=ks, other=0)
        v = tl.load(l_ptr + t * sl + e, mask=ks, other=float("-inf")).to(tl.float32)
        p = tl.exp(v - tl.max(v, axis=0))
        w = p / tl.sum(p, axis=0)
        if M > 0:
            # the shared expert's slots: sigmoid of its gate logit, rounded to the gate's type as
            # torch.sigmoid on that type rounds it (the unfolded graph's sigmoid node)
            g = tl.load(g_ptr + t * sg).to(tl.float32)
            sig = (1.0 / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)
            w = tl.where(ks, w, sig)
        tl.store(w_ptr + t * (K + M) + slot, w, mask=slot < K + M)

    @triton.jit
    def _moe_sum_k(y_ptr, w_ptr, o_ptr, H, sy_t, sy_k, K: tl.constexpr, KP: tl.constexpr, BH: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BH + tl.arange(0, BH)
        slot = tl.arange(0, KP)
        ks = slot < K
        mh = offs < H
        y = tl.load(y_ptr + t * sy_t + slot[:, None] * sy_k + offs[None, :], mask=ks[:, None] & mh[None, :],
                    other=0.0)  # [KP,BH]
        # the reference casts the weights to y's type and rounds each product to it, then sums
        w = tl.load(w_ptr + t * K + slot, mask=ks, other=0.0).to(y.dtype).to(tl.float32)
        prod = (y.to(tl.float32) * w[:, None]).to(y.dtype).to(tl.float32)
        tl.store(o_ptr + t * H + offs, tl.sum(prod, axis=0).to(o_ptr.dtype.element_ty), mask=mh)

    @triton.jit
    def _moe_add_norm_k(a_ptr, y_ptr, wk_ptr, nw_ptr, s_ptr, o_ptr, H, sy_t, sy_k, eps, K: tl.constexpr,
                        OFFSET: tl.constexpr, HAS_OFF: tl.constexpr, BLOCK: tl.constexpr):
        # a decode step's layer end: moe_sum (each product rounded as _moe_sum_k rounds it,
        # summed in slot order), the residual add (as torch's add rounds it, written out: the
        # next residual reads it) and the next norm (as fused._add_rms_norm_k), one row per
        # program; the slots are a loop, not a [K, H] tile (which would not fit in registers)
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mh = offs < H
        a = tl.load(a_ptr + t * H + offs, mask=mh, other=0.0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            y = tl.load(y_ptr + t * sy_t + j * sy_k + offs, mask=mh, other=0.0)
            wj = tl.load(wk_ptr + t * K + j).to(y.dtype).to(tl.float32)
            acc += (y.to(tl.float32) * wj).to(y.dtype).to(tl.float32)
        moe = acc.to(a.dtype)
        x = (a.to(tl.float32) + moe.to(tl.float32)).to(a.dtype)
        tl.store(s_ptr + t * H + offs, x, mask=mh)
        out = norm_row(x, nw_ptr, offs, mh, H, eps, OFFSET, HAS_OFF)
        tl.store(o_ptr + t * H + offs, out.to(o_ptr.dtype.element_ty), mask=mh)


def topk_ok(logits: torch.Tensor, k: int) -> bool:
    return (usable(logits) and logits.dim() == 2 and logits.shape[1] <= TOPK_MAX_E and 0 < k <= TOPK_MAX_K
            and logits.shape[0] > 0 and logits.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _kp(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def topk_softmax(logits: torch.Tensor, k: int, shared: int = 0, gate: torch.Tensor | None = None,
                 choices: KernelChoices | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [T,E] -> (ids i32 [T,k], weights f32 [T,k]): the k largest logits, largest first
    (the set torch.topk picks when there are no ties), and the softmax over them (the routing
    weights with norm: softmax over all E renormalised over the chosen k is the same).
    `shared` = m appends the ids E..E+m-1 ([T,k+m]); their weights are sigmoid(`gate` [T,1])
    as selected_softmax computes them, or, without a gate, none are given (None): moe_weights
    then reads the gate itself."""
    T, E = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    with_gate = bool(shared) and gate is not None
    weights = with_gate or not shared  # shared slots without their gate: moe_weights makes them
    ids = torch.empty((T, k + shared), dtype=torch.int32, device=logits.device)
    wts = torch.empty((T, k + shared), dtype=torch.float32, device=logits.device) if weights else ids
    g = gate if with_gate else wts  # a placeholder pointer when there is no gate
    BE = max(16, triton.next_power_of_2(E))

    def run(warps: int) -> torch.Tensor:
        with on(ids):
            _topk_k[(T,)](logits, ids, wts, g, E, logits.stride(0), g.stride(0), K=k, M=shared, KP=_kp(k + shared),
                          BE=BE, GATE=with_gate, num_warps=warps)
        return ids

    run(_topk_warps(logits, BE, k, shared, run, or_fresh(choices).topk_warps))
    return ids, (wts if weights else None)


def _topk_warps(logits: torch.Tensor, BE: int, k: int, m: int, run: Any, chosen: dict[tuple, int]) -> int:
    # chosen: (T, E, k, m, dtype, device) -> warps, measured (a decode step's k sequential
    # arg-max rounds are reductions across the warps: fewer warps, fewer barriers)
    base = 4 if BE <= 1024 else 8
    key = (logits.shape[0], logits.shape[1], k, m, str(logits.dtype), str(logits.device))
    if key in chosen:
        return chosen[key]
    if not logits.is_cuda or torch.cuda.is_current_stream_capturing() or logits.shape[0] > 64:
        return base
    from backends.cuda.triton_kernels.gemv import fastest

    cands = {str(w): (lambda w=w: run(w)) for w in (base, 1, 2)}  # the same ids whatever the warps
    chosen[key] = int(fastest(cands, str(base), logits.device))
    return chosen[key]


def selected_softmax(logits: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor | None = None,
                     shared: int = 0) -> torch.Tensor:
    """logits [T,E], ids [T,k] -> f32 [T,k]: softmax over each row's chosen logits. With
    `shared` = m and the shared expert's gate [T,1], ids are [T,k+m] (the m shared slots last)
    and the m last weights are sigmoid(gate), as moe.moe_weights computes them."""
    T, kt = ids.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids = ids if ids.is_contiguous() else ids.contiguous()
    wts = torch.empty((T, kt), dtype=torch.float32, device=logits.device)
    g = gate if gate is not None and shared else wts  # a placeholder pointer when there is no gate
    with on(wts):
        _sel_softmax_k[(T,)](logits, ids, g, wts, logits.stride(0), g.stride(0), K=kt - shared, M=shared,
                             KP=_kp(kt), num_warps=1)
    return wts


def moe_sum(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y [T,k,H], w f32 [T,k] -> [T,H] in y's type: sum over k of y * w."""
    T, k, H = y.shape
    if y.stride(-1) != 1:
        y = y.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    BH = max(16, min(256, triton.next_power_of_2(H)))
    with on(out):
        _moe_sum_k[(T, triton.cdiv(H, BH))](y, w, out, H, y.stride(0), y.stride(1), K=k, KP=_kp(k), BH=BH,
                                            num_warps=4)
    return out


def moe_add_rms_norm(a: torch.Tensor, y: torch.Tensor, wk: torch.Tensor, w: torch.Tensor, eps: float,
                     offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a + moe_sum(y, wk), rms_norm(that)) in one launch: a [T,H] residual, y [T,k,H] expert
    outputs, wk f32 [T,k], w [H] the norm's weight; the values of moe_sum, torch's add and
    fused.rms_norm in turn."""
    T, k, H = y.shape
    if a.shape != (T, H) or a.dtype != y.dtype or w.shape != (H,) or wk.shape != (T, k):
        raise ValueError(f"moe_add_rms_norm wants a [T,H], y [T,k,H] of one type, wk [T,k], w [H]; got "
                         f"{list(a.shape)}, {list(y.shape)}, {list(wk.shape)}, {list(w.shape)}")
    a = a if a.is_contiguous() else a.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    wk = wk if wk.is_contiguous() else wk.contiguous()
    s = torch.empty_like(a)
    out = torch.empty_like(a)
    B = max(16, triton.next_power_of_2(H))
    with on(out):
        _moe_add_norm_k[(T,)](a, y, wk, w, s, out, H, y.stride(0), y.stride(1), float(eps), K=k,
                              OFFSET=float(offset), HAS_OFF=bool(offset), BLOCK=B, num_warps=4 if B <= 2048 else 8)
    return s, out
