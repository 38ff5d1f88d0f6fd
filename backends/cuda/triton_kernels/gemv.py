"""Single-row matmuls (a decode step's projections) as a Triton GEMV, where it beats cuBLAS.

At T = 1 a projection is a matrix-vector product: it should take the time of reading its
weight once. cuBLAS picks its kernel by heuristics, and on Hopper some [N, K] shapes of a
decode step get a tile that reads the weight at a fraction of the HBM rate (measured on an
H200 inside a Qwen3-Next decode step: the 528-row router at 0.4 TB/s, the 2048x4096 output
projection as split-K plus a reduction kernel at 1.9 TB/s). The kernel here gives each program
BN weight rows and walks K in BK-wide tiles, accumulating a [BN, BK] tile of products in f32
and reducing it once at the end; short N takes few rows and all of K per program, so every
program issues its loads at once.

Which is faster depends on the shape and the GPU, so it is measured, not guessed: the first
call of each (N, K, dtype, device) outside a CUDA-graph capture times cuBLAS and each tile
configuration and keeps the fastest if it beats cuBLAS by a clear margin (KernelChoices.gemv,
recorded in run metadata). The launches are queued behind a GPU sleep, so the timing is the GPU's
(kernels queued back to back, as in a captured step), not the Python launcher's; an L2-sized
write between calls makes each read its weight from HBM, as a decode step does. Calls inside
a capture before any measurement use cuBLAS.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from backends.cuda.runtime.choices import KernelChoices, or_fresh
from backends.cuda.triton_kernels.fused import on, tl, triton, usable

# (BN rows per program, BK columns per tile, warps[, pipeline stages]): tall-thin tiles for short N,
# wide for long K
CONFIGS: tuple[tuple[int, ...], ...] = ((2, 2048, 4), (4, 2048, 4), (4, 1024, 4), (8, 1024, 4),
                                        (8, 512, 4), (16, 256, 4), (8, 2048, 8), (16, 512, 8),
                                        # a fourth entry: software-pipelined loads (stages)
                                        (4, 512, 4, 3), (8, 256, 4, 3), (16, 256, 8, 3), (2, 1024, 4, 3))
REPS = 20
MARGIN = 0.9  # the GEMV replaces cuBLAS only when it takes at most 90% of cuBLAS's time


if triton is not None:

    @triton.jit
    def _gemv_k(x_ptr, w_ptr, o_ptr, N, K, sw, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        mr = rows < N
        cols = tl.arange(0, BK)
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        wrow = w_ptr + rows.to(tl.int64)[:, None] * sw
        for k0 in tl.range(0, K, BK, num_stages=STAGES):  # STAGES > 1: the next tiles' loads in flight
            c = k0 + cols
            mc = c < K
            xv = tl.load(x_ptr + c, mask=mc, other=0.0).to(tl.float32)
            wv = tl.load(wrow + c[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
            acc += wv.to(tl.float32) * xv[None, :]
        tl.store(o_ptr + rows, tl.sum(acc, axis=1).to(o_ptr.dtype.element_ty), mask=mr)


def _triton(x: torch.Tensor, w: torch.Tensor, cfg: tuple[int, ...]) -> torch.Tensor:
    N, K = w.shape
    bn, bk, warps, *rest = cfg
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    with on(out):
        _gemv_k[(triton.cdiv(N, bn),)](x, w, out, N, K, w.stride(0), BN=bn, BK=min(bk, max(16, triton.next_power_of_2(K))),
                                      STAGES=rest[0] if rest else 1, num_warps=warps)
    return out


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """One contiguous row of a 16-bit type against a row-major weight of the same type."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.is_cuda and usable(x) and x.dtype == w.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and w.dim() == 2 and w.stride(1) == 1
            and x.is_contiguous())


def _flush_bytes(device: torch.device) -> int:
    """Bytes to write between timed calls so that none of their operands stays in L2."""
    return max(64 << 20, 4 * int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)))


def gpu_time(fn: Callable[[], object], device: torch.device, reps: int = REPS) -> float:
    """Median GPU milliseconds of one call with its operands in HBM, not L2: in a decode step
    each weight is read once per token, after the rest of the model has gone through the cache
    (repeating a call back to back would time a 17 MB weight out of an H200's 50 MB L2)."""
    fn()  # compile / warm
    flush = torch.empty(_flush_bytes(device), dtype=torch.uint8, device=device)
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    with torch.cuda.device(device):
        # the GPU waits while the host queues every launch below (~150 us of host time each)
        torch.cuda._sleep(max(2_000_000, 300_000 * reps))
        for start, end in marks:
            flush.zero_()
            start.record()
            fn()
            end.record()
    marks[-1][1].synchronize()
    times = sorted(s.elapsed_time(e) for s, e in marks)
    return times[len(times) // 2]


def fastest(candidates: dict[str, Callable[[], torch.Tensor]], default: str, device: torch.device) -> str:
    """The candidate that runs fastest on `device`, if it takes at most MARGIN of `default`'s
    time and agrees with it (a coin flip between near-equal kernels would make the logits
    depend on timing noise); else `default`. Candidates that do not compile are skipped."""
    ref = candidates[default]()
    times = {default: gpu_time(candidates[default], device)}
    for name, fn in candidates.items():
        if name == default:
            continue
        try:
            got = fn()
        except Exception:  # a tile this GPU cannot compile: not a candidate
            continue
        err = float((got.float() - ref.float()).abs().max())
        if err > 1e-2 * float(ref.float().abs().max()) + 1e-3:
            continue  # never trade accuracy for speed
        times[name] = gpu_time(fn, device)
    best = min(times, key=lambda n: times[n])
    return best if times[best] <= MARGIN * times[default] else default


def _choose(x: torch.Tensor, w: torch.Tensor, key: tuple[int, int, str, str], chosen: dict) -> str:
    cands: dict[str, Callable[[], torch.Tensor]] = {"cublas": lambda: F.linear(x, w)}
    cands.update({",".join(map(str, c)): (lambda c=c: _triton(x, w, c)) for c in CONFIGS})
    chosen[key] = fastest(cands, "cublas", x.device)
    return chosen[key]


def matmul(x: torch.Tensor, w: torch.Tensor, choices: KernelChoices | None = None) -> torch.Tensor:
    """x [1,K] @ w[N,K]^T -> [1,N]: the measured-faster of cuBLAS and the Triton GEMV
    (measured once per shape and session: `choices.gemv`)."""
    chosen = or_fresh(choices).gemv
    key = (w.shape[0], w.shape[1], str(w.dtype), str(w.device))
    best = chosen.get(key)
    if best is None:
        if torch.cuda.is_current_stream_capturing():
            return F.linear(x, w)
        best = _choose(x, w, key, chosen)
    if best == "cublas":
        return F.linear(x, w)
    return _triton(x, w, tuple(int(v) for v in best.split(",")))
