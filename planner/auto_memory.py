"""Memory of a plan: the union of the weight and state pieces of every placement it runs.

A plan keeps everything any of its placements reads resident (weights never move; both state
layouts stay allocated when PP and TG or two depth ranges use different ones), plus the largest
compute buffer; `check_fit` against the system's GPU memory decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from graphir.graph import Graph

from planner.auto_space import resident_pieces
from passes.memory import DeviceMemory, MemoryPlan, MemoryPlanError, check_fit, plan_memory


KIND = {"weight": 0, "kv": 1, "state": 2}  # DeviceMemory's weights, kv, state


@dataclass
class ResidentMemory:
    """Union of resident pieces over sets of candidates, checked with `check_fit`."""

    devices: tuple[str, ...]
    capacity: tuple[int, ...]
    ctx: int
    ubatch: int

    def __post_init__(self) -> None:
        self.ids: dict[tuple, int] = {}
        self.nbytes: list[int] = []
        self.kind: list[int] = []  # KIND of each piece
        self.dev: list[int] = []
        self.per_cand: list[np.ndarray] = []
        self.compute: list[np.ndarray] = []
        self.cache: dict[tuple[int, ...], bool] = {}

    def add(self, placed: Sequence[Graph]) -> int:
        """Register one candidate's placed graphs; returns its index."""
        pieces: dict[tuple, int] = {}
        for g in placed:
            pieces.update(resident_pieces(g, self.ctx))
        rows = []
        for key in sorted(pieces):
            if key not in self.ids:
                self.ids[key] = len(self.nbytes)
                self.nbytes.append(pieces[key])
                self.kind.append(KIND[key[0]])
                self.dev.append(self.devices.index(key[1][1]))
            rows.append(self.ids[key])
        self.per_cand.append(np.array(rows, dtype=int))
        comp = np.zeros(len(self.devices))
        for g in placed:
            for d in plan_memory(g, self.ctx, self.ubatch).devices:
                if d.device in self.devices:
                    k = self.devices.index(d.device)
                    comp[k] = max(comp[k], d.compute)
        self.compute.append(comp)
        return len(self.per_cand) - 1

    def plan(self, cands: Sequence[int]) -> MemoryPlan:
        ids = np.unique(np.concatenate([self.per_cand[c] for c in cands]))
        nb, kind, dev = (np.asarray(x)[ids] for x in (self.nbytes, self.kind, self.dev))
        comp = np.max([self.compute[c] for c in cands], axis=0)
        mem = [DeviceMemory(d, *(int(nb[(dev == j) & (kind == k)].sum()) for k in range(3)), int(comp[j]))
               for j, d in enumerate(self.devices)]
        return MemoryPlan(self.ctx, self.ubatch, tuple(mem))

    def fits(self, cands: tuple[int, ...]) -> bool:
        if cands not in self.cache:
            try:
                check_fit(self.plan(cands), self.capacity)
                self.cache[cands] = True
            except MemoryPlanError:
                self.cache[cands] = False
        return self.cache[cands]
