"""Grouped expert matmuls (CUDA fast path of Op.MOE_MATMUL): no Python loop over experts.

Token rows are sorted by expert once; then either `torch._grouped_mm` (Hopper, bf16) runs
every expert's product in one launch, reading only the experts that got tokens, or — where
it is absent — a padded batched matmul over the experts in use does the same work with a
few extra zero rows. For decode (few rows) the selected experts' weights are gathered and
multiplied in one bmm, which reads exactly the k experts a token uses.
"""

from __future__ import annotations

import torch


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    # 16-byte alignment of rows for the TMA loads inside the kernel
    return w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0


def moe_matmul(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T,K] or [T,k,K]; w [E,N,K]; ids [T,k] -> [T,k,N]."""
    T, k = ids.shape
    E, N, K = w.shape
    rows = x.unsqueeze(1).expand(T, k, K) if x.dim() == 2 else x  # [T,k,K]
    flat_ids = ids.reshape(-1).long()  # [T*k]
    if T * k <= 16:
        # decode: gather the used experts' weights; one bmm reads exactly those bytes
        wsel = w.index_select(0, flat_ids)  # [T*k,N,K]
        out = torch.bmm(wsel, rows.reshape(T * k, K, 1).to(w.dtype))  # [T*k,N,1]
        return out.reshape(T, k, N).to(x.dtype)
    order = torch.argsort(flat_ids, stable=True)
    xs = rows.reshape(T * k, K).index_select(0, order)  # [T*k,K] grouped by expert
    counts = torch.bincount(flat_ids, minlength=E)
    if _grouped_mm_ok(xs, w):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        ys = torch._grouped_mm(xs.to(w.dtype), w.transpose(1, 2), offs=offs)  # [T*k,N]
    else:
        ys = _padded_bmm(xs.to(w.dtype), w, counts)
    out = torch.empty_like(ys)
    out.index_copy_(0, order, ys)
    return out.reshape(T, k, N).to(x.dtype)


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
