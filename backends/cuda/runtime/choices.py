"""Kernel choices made by timing or by a first failure, kept for one session.

A fast path that is measured (the GEMV tile, the MoE GEMV tile, the top-k warps, the delta-net
prefill tile) or that may fail once on a GPU (grouped GEMM, NCCL, the flash kernel's lower-right
causal mask) records what it found here, so that it is decided once per session, not on every
call, and so that every run's metadata says which kernels ran (`diagnostics`). The session and
the multi-process rank session own one each and hand it to kernels through ExecContext.choices;
nothing of it lives in module globals, so two sessions in one process do not share decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KernelChoices:
    """What the timed and fallible fast paths chose, by the shape they chose it for."""

    gemv: dict[tuple[int, int, str, str], str] = field(default_factory=dict)  # (N, K, dtype, device) -> "cublas" | "BN,BK,warps"
    # kept GGUF weights (quant/kept.py): (N, K, qtype, dtype, device) -> tile (BN, BB, warps, split), None: torch
    quant_gemv: dict[tuple[int, int, str, str, str], tuple[int, ...] | None] = field(default_factory=dict)
    moe_gemv: dict[tuple, tuple[int, ...]] = field(default_factory=dict)  # (N, K, slots, dtype, device, swiglu) -> tile
    topk_warps: dict[tuple, int] = field(default_factory=dict)  # (T, E, k, m, dtype, device) -> warps
    grouped_mm_failed: list[str] = field(default_factory=list)  # the first failure of _grouped_mm: tried once
    nccl_failed: list[str] = field(default_factory=list)  # the first NCCL failure: peer copies from then on
    flash_lower_right: bool | None = None  # the flash kernel's causal mask checked once against an explicit one
    flash_window: bool | None = None  # the flash kernel's sliding window (and the sink rescale) checked once
    flash_window_note: str = ""  # why: its error on first use, or the failure
    # the delta-net prefill: "impl" (chunked | recurrent), the chosen tile "config", "prep", "errors", ...
    deltanet_prefill: dict[str, Any] = field(default_factory=lambda: {"impl": "chunked"})

    def diagnostics(self) -> dict[str, object]:
        """Which fast paths were chosen or fell back (for run metadata and benchmark records)."""
        return {"grouped_mm_failed": list(self.grouped_mm_failed), "nccl_failed": list(self.nccl_failed),
                "flash_lower_right": self.flash_lower_right, "flash_window": self.flash_window,
                "flash_window_note": self.flash_window_note,
                "delta_net_prefill": dict(self.deltanet_prefill),
                "gemv": {f"{n}x{k} {dt}": c for (n, k, dt, _), c in sorted(self.gemv.items())},
                "quant_gemv": {f"{n}x{k} {q} {dt}": "torch" if c is None else ",".join(map(str, c))
                               for (n, k, q, dt, _), c in sorted(self.quant_gemv.items())},
                "moe_gemv": {f"{n}x{k} slots {s} {dt}{' swiglu' if gated else ''}": ",".join(map(str, c))
                             for (n, k, s, dt, _, gated), c in sorted(self.moe_gemv.items())},
                "topk_warps": {f"T {t} E {e} k {k}+{m}": w
                               for (t, e, k, m, _, _), w in sorted(self.topk_warps.items())}}


def or_fresh(choices: KernelChoices | None) -> KernelChoices:
    """A caller outside a session (a benchmark, a kernel test) that passes none measures afresh
    and keeps nothing."""
    return choices if choices is not None else KernelChoices()
