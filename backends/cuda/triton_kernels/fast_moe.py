"""Grouped expert matmuls (CUDA fast paths of the MoE matmul ops): no Python loop over
experts, no host synchronisation.

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

The router's small ops (top-k with its weights, the weighted sum) are in moe_router.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cuda.runtime.choices import KernelChoices, or_fresh
from backends.cuda.triton_kernels.fused import on, tl, triton, usable

DECODE_SLOTS = 64  # T*k up to this many slots takes the GEMV path


if triton is not None:
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


def _tile(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, up: torch.Tensor | None,
          choices: KernelChoices | None) -> tuple[int, ...]:
    chosen = or_fresh(choices).moe_gemv  # (N, K, slots, dtype, device, swiglu) -> tile
    E, N, K = w.shape
    key = (N, K, ids.numel(), str(x.dtype), str(x.device), up is not None)
    got = chosen.get(key)
    if got is not None:
        return got
    base = gemv_config(N, K)
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return base
    from backends.cuda.triton_kernels.gemv import fastest

    cands = {",".join(map(str, c)): (lambda c=c: moe_gemv(x, w, ids, c, up)) for c in (base, *GEMV_TILES)}
    best = fastest(cands, ",".join(map(str, base)), x.device)
    chosen[key] = tuple(int(v) for v in best.split(","))
    return chosen[key]


def moe_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
             config: tuple[int, ...] | None = None, up: torch.Tensor | None = None,
             choices: KernelChoices | None = None) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K] contiguous; ids [T,k] -> [T,k,N] in x's type.
    `up` (x's shape): the product reads swiglu(x, up) as it loads, the value of
    moe_gemv(swiglu(x, up), ...) without the launch and the round trip between them.
    `config` (BN, BK, num_warps[, stages]) overrides the tile (benchmarks); by default the measured
    fastest of gemv_config's and GEMV_TILES for this shape on this GPU (kept in `choices.moe_gemv`)."""
    if config is None:
        config = _tile(x, w, ids, up, choices)
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


def moe_grouped(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, r: Route | None = None,
                choices: KernelChoices | None = None) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K]; ids [T,k] -> [T,k,N]: slots sorted by expert, one grouped
    GEMM. `r` is route(ids, E) when the caller already has it. The first failure of _grouped_mm
    is kept in `choices.grouped_mm_failed`, so it is tried once."""
    failed = or_fresh(choices).grouped_mm_failed
    T, k = ids.shape
    E, N, K = w.shape
    if r is None:
        r = route(ids, E)
    # each sorted slot reads its own row of a [T,k,K] x, or its token's row of a [T,K] x
    src, div = (x.reshape(T * k, K), 1) if x.dim() == 3 else (x, k)
    xs = _rows(src, r.order, div, w.dtype, scatter=False)  # [T*k,K] by expert
    ys = None
    if _grouped_mm_ok(xs, w) and not failed:
        try:
            ys = torch._grouped_mm(xs, w.transpose(1, 2), offs=r.ends)  # [T*k,N]
        except (RuntimeError, TypeError) as e:  # an older or stricter build: keep the padded path
            failed.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if ys is None:
        counts = torch.diff(r.ends, prepend=r.ends.new_zeros(1)).long()
        ys = _padded_bmm(xs, w, counts)
    return _rows(ys, r.order, 1, x.dtype, scatter=True).view(T, k, N)  # back to slot order


def moe_matmul(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, r: Route | None = None,
               choices: KernelChoices | None = None) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K]; ids [T,k] -> [T,k,N]. `r`: a shared route(ids, E)."""
    if ids.numel() <= DECODE_SLOTS and usable(x):
        return moe_gemv(x, w, ids, choices=choices)
    if ids.numel() <= DECODE_SLOTS:
        T, k = ids.shape
        K = w.shape[2]
        rows = (x.unsqueeze(1).expand(T, k, K) if x.dim() == 2 else x).reshape(T * k, K, 1)
        wsel = w.index_select(0, ids.reshape(-1).long())  # [T*k,N,K]
        return torch.bmm(wsel, rows.to(w.dtype)).reshape(T, k, -1).to(x.dtype)
    return moe_grouped(x, w, ids, r, choices)


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
