"""Grouped expert matmuls and the router's small ops (CUDA fast paths of the MoE ops): no
Python loop over experts, no host synchronisation.

Decode (a few token slots): a Triton GEMV reads each chosen expert's weight rows straight
from the [E,N,K] tensor, one program per (slot, block of N rows): exactly the bytes of the k
experts a token uses, once, in one launch (a gather-then-bmm would read them three times).

Prefill: `route` sorts the slots by expert once per ids tensor (the rule table keeps it for
every moe_matmul reading the same ids in a graph call); the group ends come from a
`searchsorted` on the sorted ids (bincount would read its maximum back to the host). Rows
are gathered into expert order and cast in one pass, `torch._grouped_mm` (Hopper, bf16) runs
every expert's product in one launch, and one more pass scatters the rows back to slot
order in the output type. Where _grouped_mm is absent, a padded batched matmul over the
experts in use does the same work (that fallback sizes its batch on the host, so it
synchronises once).

Router: one Triton program per token row picks the top k logits (k rounds of max/argmax
over the row held in registers) and the softmax over the chosen logits (the `norm` routing
weights) in the same launch; `moe_sum` is one launch too. A folded shared expert (`shared`
= m slots, passes/shared_expert.py) is m more experts E..E+m-1 to every kernel here: the top-k
kernel writes their ids in the same launch, and the selected-softmax kernel their weights
(the sigmoid of the shared gate) beside the k routed ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backends.cuda.fused import on, tl, triton, usable

DECODE_SLOTS = 64  # T*k up to this many slots takes the GEMV path
TOPK_MAX_E = 4096  # widest router row the top-k kernel holds in registers
TOPK_MAX_K = 64


if triton is not None:
    from backends.cuda.fused import norm_row  # a jit helper the layer-end kernel calls

    @triton.jit
    def _moe_gemv_k(x_ptr, u_ptr, w_ptr, ids_ptr, o_ptr, N, K, KSLOT, sx, PER_SLOT: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr, STAGES: tl.constexpr):
        s = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(ids_ptr + s).to(tl.int64)
        row = s if PER_SLOT else s // KSLOT
        offs_n = nb * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        mn = offs_n < N
        wp = w_ptr + e * N * K + offs_n[:, None] * K + offs_k[None, :]  # [BN,BK]
        xp = x_ptr + row * sx + offs_k
        up = u_ptr + row * sx + offs_k
        # products accumulate per lane; one cross-lane reduction at the end, not one per step
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=STAGES):  # STAGES > 1: the next tiles' loads in flight
            if EVEN:  # no masks: the loads stay 16-byte vectors
                xv = tl.load(xp)
                wv = tl.load(wp).to(tl.float32)
            else:
                mk = (k0 + offs_k) < K
                xv = tl.load(xp, mask=mk, other=0.0)
                wv = tl.load(wp, mask=mn[:, None] & mk[None, :], other=0.0).to(tl.float32)
            if GATED:  # x = swiglu(x, u), rounded where _swiglu_k rounds (silu, then the product)
                if EVEN:
                    uv = tl.load(up).to(tl.float32)
                else:
                    uv = tl.load(up, mask=mk, other=0.0).to(tl.float32)
                gf = xv.to(tl.float32)
                sv = (gf / (1.0 + tl.exp(-gf))).to(xv.dtype).to(tl.float32)
                xv = (sv * uv).to(xv.dtype)
                up += BK
            acc += wv * xv.to(tl.float32)[None, :]
            wp += BK
            xp += BK
        out = tl.sum(acc, axis=1)
        if EVEN:
            tl.store(o_ptr + s * N + offs_n, out.to(o_ptr.dtype.element_ty))
        else:
            tl.store(o_ptr + s * N + offs_n, out.to(o_ptr.dtype.element_ty), mask=mn)

    @triton.jit
    def _rows_k(src_ptr, idx_ptr, out_ptr, D, s_src, s_out, DIV, SCATTER: tl.constexpr, BD: tl.constexpr):
        # gather: out[i] = src[idx[i] // DIV]; scatter: out[idx[i]] = src[i]; cast to out's type
        i = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BD + tl.arange(0, BD)
        m = offs < D
        j = tl.load(idx_ptr + i).to(tl.int64)
        if SCATTER:
            v = tl.load(src_ptr + i * s_src + offs, mask=m)
            tl.store(out_ptr + j * s_out + offs, v.to(out_ptr.dtype.element_ty), mask=m)
        else:
            v = tl.load(src_ptr + (j // DIV) * s_src + offs, mask=m)
            tl.store(out_ptr + i * s_out + offs, v.to(out_ptr.dtype.element_ty), mask=m)

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


# ---- decode: GEMV over the chosen experts --------------------------------------------------------

def gemv_config(N: int, K: int) -> tuple[int, int, int]:
    """(BN, BK, num_warps) for an [N,K] expert slice: 128 columns a step, more rows per
    program for a short K (the down projection) so each program still reads enough."""
    # measured on an H200 (bench/bench_moe.py): gate_up [512,1024,2048] 13.0 us with (16,128,8)
    # against 14.4 with (16,256,4); down [512,2048,512] 7.4 us with (64,128,8) against 9.1
    if K <= 512:
        return 64, min(128, max(16, triton.next_power_of_2(K))), 8
    return 16, 128, 8


# tiles tried against gemv_config's on the first eager call of each shape (GPU-timed, kept only
# when clearly faster: gemv.fastest); whole-K tiles for the short-K down projection, few-row
# long-K tiles (a program issues all its loads at once) for the gate/up projection
GEMV_TILES: tuple[tuple[int, ...], ...] = ((16, 128, 8), (64, 128, 8), (8, 512, 4), (16, 512, 8),
                                           (32, 256, 8), (16, 256, 4), (8, 256, 4), (2, 2048, 4),
                                           (4, 2048, 8), (4, 1024, 4), (8, 1024, 8),
                                           # a fourth entry: software-pipelined loads (stages)
                                           (16, 128, 8, 3), (16, 256, 8, 3), (64, 128, 8, 3), (32, 128, 8, 4))
GEMV_CHOICE: dict[tuple, tuple[int, ...]] = {}  # (N, K, slots, dtype, device, swiglu) -> tile


def _tile(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, up: torch.Tensor | None = None
          ) -> tuple[int, ...]:
    E, N, K = w.shape
    key = (N, K, ids.numel(), str(x.dtype), str(x.device), up is not None)
    got = GEMV_CHOICE.get(key)
    if got is not None:
        return got
    base = gemv_config(N, K)
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return base
    from backends.cuda.gemv import fastest

    cands = {",".join(map(str, c)): (lambda c=c: moe_gemv(x, w, ids, c, up)) for c in (base, *GEMV_TILES)}
    best = fastest(cands, ",".join(map(str, base)), x.device)
    GEMV_CHOICE[key] = tuple(int(v) for v in best.split(","))  # type: ignore[assignment]
    return GEMV_CHOICE[key]


def moe_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
             config: tuple[int, ...] | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K] contiguous; ids [T,k] -> [T,k,N] in x's type.
    `up` (x's shape): the product reads swiglu(x, up) as it loads, the value of
    moe_gemv(swiglu(x, up), ...) without the launch and the round trip between them.
    `config` (BN, BK, num_warps[, stages]) overrides the tile (benchmarks); by default the measured
    fastest of gemv_config's and GEMV_TILES for this shape on this GPU."""
    if config is None:
        config = _tile(x, w, ids, up)
    T, k = ids.shape
    E, N, K = w.shape
    per_slot = x.dim() == 3
    xs = x.reshape(T * k, K) if per_slot else x
    us = xs if up is None else (up.reshape(T * k, K) if per_slot else up)
    if xs.stride(-1) != 1 or us.stride() != xs.stride():
        xs, us = xs.contiguous(), us.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    ids = ids if ids.is_contiguous() else ids.contiguous()
    out = torch.empty((T * k, N), dtype=x.dtype, device=x.device)
    BN, BK, warps, *rest = config
    even = N % BN == 0 and K % BK == 0
    with on(out):
        _moe_gemv_k[(T * k, triton.cdiv(N, BN))](xs, us, w, ids, out, N, K, k, xs.stride(0), PER_SLOT=per_slot,
                                                  BN=BN, BK=BK, EVEN=even, GATED=up is not None,
                                                  STAGES=rest[0] if rest else 1, num_warps=warps)
    return out.view(T, k, N)


# ---- prefill: slots sorted by expert, one grouped GEMM -----------------------------------------

@dataclass(frozen=True)
class Route:
    """Slots [T*k] sorted by expert: what every moe_matmul over the same ids shares."""

    order: torch.Tensor  # [T*k] i64: the slot at each sorted position
    ends: torch.Tensor  # [E] i32: where each expert's group ends in sorted order (_grouped_mm offs)


def route(ids: torch.Tensor, n_experts: int) -> Route:
    """Sort the slots of ids [T,k] by expert, on the device (no host synchronisation)."""
    flat = ids.reshape(-1)
    # a 16-bit key halves the radix sort's passes over 32-bit ids (expert ids fit easily)
    key_dt = torch.int16 if n_experts <= torch.iinfo(torch.int16).max else torch.int32
    sorted_ids, order = torch.sort(flat.to(key_dt), stable=True)
    # group e ends after the slots with id <= e
    ends = torch.searchsorted(sorted_ids, torch.arange(n_experts, device=ids.device, dtype=key_dt), right=True,
                              out_int32=True)
    return Route(order, ends)


def _rows(src: torch.Tensor, idx: torch.Tensor, div: int, dtype: torch.dtype, scatter: bool) -> torch.Tensor:
    """gather: out[i] = src[idx[i] // div]; scatter: out[idx[i]] = src[i] (idx a permutation);
    out in `dtype`, the cast done in the same pass."""
    n, D = idx.shape[0], src.shape[1]
    if not usable(src):  # CUDA without Triton
        if scatter:
            out = torch.empty((n, D), dtype=src.dtype, device=src.device)
            return out.index_copy_(0, idx, src).to(dtype)
        return src.index_select(0, idx if div == 1 else torch.div(idx, div, rounding_mode="floor")).to(dtype)
    if src.stride(-1) != 1:
        src = src.contiguous()
    out = torch.empty((n, D), dtype=dtype, device=src.device)
    BD = min(1024, triton.next_power_of_2(D))
    with on(out):
        _rows_k[(n, triton.cdiv(D, BD))](src, idx, out, D, src.stride(0), out.stride(0), div, SCATTER=scatter,
                                         BD=BD, num_warps=4)
    return out


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    # 16-byte alignment of rows for the TMA loads inside the kernel
    return w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0


_GROUPED_BROKEN: list[str] = []  # the first failure of _grouped_mm, kept so it is tried once


def moe_grouped(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, r: Route | None = None) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K]; ids [T,k] -> [T,k,N]: slots sorted by expert, one grouped
    GEMM. `r` is route(ids, E) when the caller already has it."""
    T, k = ids.shape
    E, N, K = w.shape
    if r is None:
        r = route(ids, E)
    # each sorted slot reads its own row of a [T,k,K] x, or its token's row of a [T,K] x
    src, div = (x.reshape(T * k, K), 1) if x.dim() == 3 else (x, k)
    xs = _rows(src, r.order, div, w.dtype, scatter=False)  # [T*k,K] by expert
    ys = None
    if _grouped_mm_ok(xs, w) and not _GROUPED_BROKEN:
        try:
            ys = torch._grouped_mm(xs, w.transpose(1, 2), offs=r.ends)  # [T*k,N]
        except (RuntimeError, TypeError) as e:  # an older or stricter build: keep the padded path
            _GROUPED_BROKEN.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if ys is None:
        counts = torch.diff(r.ends, prepend=r.ends.new_zeros(1)).long()
        ys = _padded_bmm(xs, w, counts)
    return _rows(ys, r.order, 1, x.dtype, scatter=True).view(T, k, N)  # back to slot order


def moe_matmul(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, r: Route | None = None) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K]; ids [T,k] -> [T,k,N]. `r`: a shared route(ids, E)."""
    if ids.numel() <= DECODE_SLOTS and usable(x):
        return moe_gemv(x, w, ids)
    if ids.numel() <= DECODE_SLOTS:
        T, k = ids.shape
        K = w.shape[2]
        rows = (x.unsqueeze(1).expand(T, k, K) if x.dim() == 2 else x).reshape(T * k, K, 1)
        wsel = w.index_select(0, ids.reshape(-1).long())  # [T*k,N,K]
        return torch.bmm(wsel, rows.to(w.dtype)).reshape(T, k, -1).to(x.dtype)
    return moe_grouped(x, w, ids, r)


def _padded_bmm(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Experts in use as one padded batch: [E_used, max_rows, K] @ [E_used, K, N]."""
    used = torch.nonzero(counts).flatten()  # experts with tokens, ascending = sorted order
    c = counts.index_select(0, used)
    max_rows = int(c.max())
    starts = torch.cumsum(c, 0) - c
    pos = torch.arange(xs.shape[0], device=xs.device) - torch.repeat_interleave(starts, c)
    slot = torch.repeat_interleave(torch.arange(used.numel(), device=xs.device), c)
    padded = xs.new_zeros((used.numel(), max_rows, xs.shape[1]))
    padded[slot, pos] = xs
    y = torch.bmm(padded, w.index_select(0, used).transpose(1, 2))  # [E_used,max_rows,N]
    return y[slot, pos]


# ---- router and weighted sum ---------------------------------------------------------------

def topk_ok(logits: torch.Tensor, k: int) -> bool:
    return (usable(logits) and logits.dim() == 2 and logits.shape[1] <= TOPK_MAX_E and 0 < k <= TOPK_MAX_K
            and logits.shape[0] > 0 and logits.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _kp(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def topk_softmax(logits: torch.Tensor, k: int, shared: int = 0, gate: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    run(_topk_warps(logits, BE, k, shared, run))
    return ids, (wts if weights else None)


TOPK_WARPS: dict[tuple, int] = {}  # (T, E, k, m, dtype, device) -> warps, measured (a decode step's k
# sequential arg-max rounds are reductions across the warps: fewer warps, fewer barriers)


def _topk_warps(logits: torch.Tensor, BE: int, k: int, m: int, run: Any) -> int:
    base = 4 if BE <= 1024 else 8
    key = (logits.shape[0], logits.shape[1], k, m, str(logits.dtype), str(logits.device))
    if key in TOPK_WARPS:
        return TOPK_WARPS[key]
    if not logits.is_cuda or torch.cuda.is_current_stream_capturing() or logits.shape[0] > 64:
        return base
    from backends.cuda.gemv import fastest

    cands = {str(w): (lambda w=w: run(w)) for w in (base, 1, 2)}  # the same ids whatever the warps
    TOPK_WARPS[key] = int(fastest(cands, str(base), logits.device))
    return TOPK_WARPS[key]


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
