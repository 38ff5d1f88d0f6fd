"""The workload: what a sweep runs and what the auto search minimises, with its one set of
defaults (llama-sweep-bench's: u-batch 2048, 128 decoded tokens a row, a 98304-token context).

`predict` sweeps its rows; `place_auto` weighs them: per depth N_KV, `pp_weight` x the seconds
of one u-batch of PP plus `tg_weight` x the seconds of `tg` decoded tokens, times the depth's
weight. The system and engine the search prices by default are named here too, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphir.errors import GraphirError

# What `--split auto` prices when no --hw / --engine is given: the rig and engine the cost
# model's measured tables were taken on (docs/results/), the same defaults as `predict`.
DEFAULT_HW = "2x3090"
DEFAULT_ENGINE = "ik_llama.cpp"


class WorkloadError(GraphirError):
    """A workload that cannot be swept or searched for (non-positive sizes, bad weights)."""


@dataclass(frozen=True)
class Workload:
    """Rows N_KV = 0, ub, 2 ub, ... < ctx (or the `depths` given), every row alike unless
    `depth_weights` say otherwise."""

    ubatch: int = 2048
    tg: int = 128
    ctx: int = 98304  # KV cache size (memory) and, without `depths`, the sweep's end
    depths: tuple[int, ...] = ()
    pp_weight: float = 1.0
    tg_weight: float = 1.0
    depth_weights: tuple[float, ...] = ()  # one per depth; () = uniform

    def __post_init__(self) -> None:
        if self.ubatch <= 0 or self.tg <= 0 or self.ctx <= 0:
            raise WorkloadError(f"u-batch, tg and ctx must be positive (got {self.ubatch}, {self.tg}, {self.ctx})")
        if self.pp_weight < 0 or self.tg_weight < 0 or self.pp_weight + self.tg_weight <= 0:
            raise WorkloadError(f"PP and TG weights must be >= 0 and not both 0 (got {self.pp_weight}, "
                                f"{self.tg_weight})")
        if any(d < 0 or d >= self.ctx for d in self.depths):
            raise WorkloadError(f"depths must lie in [0, ctx={self.ctx}); got {list(self.depths)}")
        if self.depth_weights and len(self.depth_weights) != len(self.rows()):
            raise WorkloadError(f"{len(self.depth_weights)} depth weight(s) for {len(self.rows())} depth(s)")
        if any(w < 0 for w in self.depth_weights):
            raise WorkloadError("depth weights must be >= 0")

    def rows(self) -> np.ndarray:
        """N_KV of each row: the `depths` given, else 0, ub, 2 ub, ... while a whole u-batch
        still fits below ctx (as sweep-bench)."""
        if self.depths:
            return np.array(sorted(self.depths), dtype=float)
        return np.arange(0, self.ctx, self.ubatch, dtype=float)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Weight of each row's PP seconds and TG seconds."""
        dw = np.array(self.depth_weights, dtype=float) if self.depth_weights else np.ones(len(self.rows()))
        return self.pp_weight * dw, self.tg_weight * dw
