"""Grouped expert matmuls (CUDA fast path of Op.MOE_MATMUL): no Python loop over experts,
no host synchronisation.

Decode (a few token slots): a Triton GEMV reads each chosen expert's weight rows straight
from the [E,N,K] tensor, one program per (slot, block of N rows): exactly the bytes of the k
experts a token uses, once, in one launch (a gather-then-bmm would read them three times).

Prefill: slots are sorted by expert once; the group ends come from a `searchsorted` on the
sorted ids (bincount would read its maximum back to the host), then `torch._grouped_mm`
(Hopper, bf16) runs every expert's product in one launch, reading only the experts that
got tokens. Where it is absent, a padded batched matmul over the experts in use does the
same work (that fallback sizes its batch on the host, so it synchronises once).
"""

from __future__ import annotations

import torch

from backends.cuda.fused import on, tl, triton, usable

DECODE_SLOTS = 64  # T*k up to this many slots takes the GEMV path


if triton is not None:

    @triton.jit
    def _moe_gemv_k(x_ptr, w_ptr, ids_ptr, o_ptr, N, K, NKB, KSLOT, sx, PER_SLOT: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
        s = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(ids_ptr + s).to(tl.int64)
        row = s if PER_SLOT else s // KSLOT
        offs_n = nb * BN + tl.arange(0, BN)
        mn = offs_n < N
        acc = tl.zeros([BN], dtype=tl.float32)
        wbase = w_ptr + e * N * K
        for kb in range(0, NKB):
            offs_k = kb * BK + tl.arange(0, BK)
            mk = offs_k < K
            xv = tl.load(x_ptr + row * sx + offs_k, mask=mk, other=0.0).to(tl.float32)
            wv = tl.load(wbase + offs_n[:, None] * K + offs_k[None, :], mask=mn[:, None] & mk[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        tl.store(o_ptr + s * N + offs_n, acc.to(o_ptr.dtype.element_ty), mask=mn)


def moe_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K] contiguous; ids [T,k] -> [T,k,N] in x's type."""
    T, k = ids.shape
    E, N, K = w.shape
    per_slot = x.dim() == 3
    xs = x.reshape(T * k, K) if per_slot else x
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    ids = ids if ids.is_contiguous() else ids.contiguous()
    out = torch.empty((T * k, N), dtype=x.dtype, device=x.device)
    BN = 16
    BK = min(256, max(16, triton.next_power_of_2(K)))
    with on(out):
        _moe_gemv_k[(T * k, triton.cdiv(N, BN))](xs, w, ids, out, N, K, triton.cdiv(K, BK), k, xs.stride(0), PER_SLOT=per_slot, BN=BN,
                                                  BK=BK, num_warps=4)
    return out.view(T, k, N)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    # 16-byte alignment of rows for the TMA loads inside the kernel
    return w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0


_GROUPED_BROKEN: list[str] = []  # the first failure of _grouped_mm, kept so it is tried once


def moe_grouped(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K]; ids [T,k] -> [T,k,N]: slots sorted by expert, one grouped GEMM."""
    T, k = ids.shape
    E, N, K = w.shape
    flat = ids.reshape(-1).long()  # [T*k]
    sorted_ids, order = torch.sort(flat)
    src = order if x.dim() == 3 else torch.div(order, k, rounding_mode="floor")  # row of x each slot reads
    xs = (x.reshape(T * k, K) if x.dim() == 3 else x).index_select(0, src).to(w.dtype)  # [T*k,K] by expert
    # group e ends after the slots with id <= e
    ends = torch.searchsorted(sorted_ids, torch.arange(E, device=ids.device), right=True)
    ys = None
    if _grouped_mm_ok(xs, w) and not _GROUPED_BROKEN:
        try:
            ys = torch._grouped_mm(xs, w.transpose(1, 2), offs=ends.to(torch.int32))  # [T*k,N]
        except (RuntimeError, TypeError) as e:  # an older or stricter build: keep the padded path
            _GROUPED_BROKEN.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if ys is None:
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        ys = _padded_bmm(xs, w, counts)
    out = torch.empty_like(ys)
    out.index_copy_(0, order, ys)
    return out.view(T, k, N).to(x.dtype)


def moe_matmul(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K]; ids [T,k] -> [T,k,N]."""
    if ids.numel() <= DECODE_SLOTS and usable(x):
        return moe_gemv(x, w, ids)
    if ids.numel() <= DECODE_SLOTS:
        T, k = ids.shape
        K = w.shape[2]
        rows = (x.unsqueeze(1).expand(T, k, K) if x.dim() == 2 else x).reshape(T * k, K, 1)
        wsel = w.index_select(0, ids.reshape(-1).long())  # [T*k,N,K]
        return torch.bmm(wsel, rows.to(w.dtype)).reshape(T, k, -1).to(x.dtype)
    return moe_grouped(x, w, ids)


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
