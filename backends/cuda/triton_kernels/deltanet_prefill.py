"""Which form of the delta-net prefill runs: measured once per session, then used.

deltanet.py has two prefill kernels: the token-serial walk (`delta_net`, T dependent
steps) and the chunked UT-transform form (`delta_net_chunked`, T/64 steps on tensor cores, in
tf32/bf16 operands). Which is faster, and which chunked tile, depends on the GPU and the head
sizes, so `calibrate` times both once at the run's u-batch and `prefill` uses the faster. What
was chosen (and what did not compile) is kept in the session's KernelChoices.deltanet_prefill.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from backends.cuda.runtime.choices import KernelChoices, or_fresh
from backends.cuda.triton_kernels.deltanet import CONFIGS, PRECISIONS, delta_net, delta_net_chunked, note_failure


def calibrate(device: torch.device, nk: int, nv: int, dk: int, dv: int, T: int = 2048,
              choices: KernelChoices | None = None) -> dict[str, float]:
    """Time the token-serial and the chunked prefill once on `device` (ms) and keep the faster
    in `choices.deltanet_prefill` ("impl"; chunked until measured otherwise); the chunked form
    with each tile of CONFIGS that compiles and agrees with the token-serial kernel (relative L2
    error < 2e-2), keeping the fastest tile ("tile_ms" lists them)."""
    choices = or_fresh(choices)
    chosen = choices.deltanet_prefill
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(T, nk, dk, device=device, generator=gen) for _ in range(2))
    v = torch.randn(T, nv, dv, device=device, generator=gen)
    g = -torch.rand(T, nv, device=device, generator=gen)
    beta = torch.rand(T, nv, device=device, generator=gen)
    s = torch.zeros(dk, nv, dv, device=device)

    def timed(fn: Callable[..., torch.Tensor]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn(q, k, v, g, beta, s)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 3

    times: dict[str, float] = {}
    ref: torch.Tensor | None = None
    try:
        ref = delta_net(q, k, v, g, beta, s)  # compile
        times["recurrent"] = timed(delta_net)
    except Exception as e:  # e.g. no registers for this tile: the chunked form only
        chosen.setdefault("errors", []).append(f"recurrent: {str(e).splitlines()[0][:200]}")
    tiles: dict[tuple[int, int, str, int], float] = {}
    errs: dict[tuple[int, int, str, int], float] = {}
    for cfg in CONFIGS:
        fn = functools.partial(delta_net_chunked, config=cfg, choices=choices)
        try:
            out = fn(q, k, v, g, beta, s)  # compile
        except Exception as e:  # a tile that does not fit this GPU's shared memory: the others
            note_failure(chosen, ("chunked", cfg), e)
            continue
        if ref is not None:  # the chunked form must agree before it is used
            errs[cfg] = float((out - ref).norm() / ref.norm())
            if not errs[cfg] < 2e-2:
                continue
        tiles[cfg] = timed(fn)
    if tiles:
        # the operand precision is fixed by preference, not by timing, so that every process
        # (and every run) computes the same numbers; only the tile shape within it is timed
        first = next(p for p in PRECISIONS if any(c[2] == p for c in tiles))
        best = min((c for c in tiles if c[2] == first), key=lambda c: tiles[c])
        chosen["config"] = best
        chosen["tile_ms"] = {str(c): round(t, 4) for c, t in tiles.items()}
        if best in errs:
            chosen["chunked_rel_err"] = errs[best]
        times["chunked"] = tiles[best]
    chosen["impl"] = min(times, key=lambda n: times[n])
    return times


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor, qk_l2norm: bool = True, choices: KernelChoices | None = None) -> torch.Tensor:
    choices = or_fresh(choices)
    chosen = choices.deltanet_prefill
    dk = q.shape[2]
    # the chunked tiles multiply in tf32 or bf16 (errors ~1e-3): right for a 16-bit model; an
    # f32 model asked for f32 results, which the token-serial kernel gives exactly
    if chosen["impl"] == "chunked" and dk >= 16 and dk & (dk - 1) == 0 and q.dtype != torch.float32:
        try:
            return delta_net_chunked(q, k, v, g, beta, state, qk_l2norm, choices=choices)
        except Exception:  # compile failure on this GPU: the token-serial kernel from now on
            chosen["impl"] = "recurrent"
    return delta_net(q, k, v, g, beta, state, qk_l2norm)
