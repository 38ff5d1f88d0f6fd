"""The auto plan: what `place_auto` (planner/auto_search.py) searched for and what it chose.

No inference engine picks its split for the user. `place_auto` does: it prices candidate
placements of both phases with the cost model (each candidate once; all depths at once),
keeps memory a hard limit, and returns a placed graph with its `AutoPlan` — which placement
runs PP and which TG at each depth, and the predicted time of every alternative considered.

Search (planner/auto_search.py): every subset of layer kinds split tensor-parallel (kinds
interact — a split delta-net only pays when the MoE around it is split too, so they are not
chosen one by one unless a model has all four kinds), then split groups (3+ devices), split
ratios, home layers (memory), a split output head and the reduce type of TG partials on the
best ones. The plan (auto_plan.py) pairs a PP and a TG candidate per depth range (at most
`max_segments` ranges) under what an engine can honestly do: resident weights, shared or
explicitly copied state, memory a hard limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.models.config import ModelConfig

from planner.auto_space import Choice, place_choice
from planner.workload import Workload
from backends.costmodel.timeline import Timeline


class AutoError(GraphirError):
    """A search request place_auto cannot honour (more devices than the system has, nothing fits)."""


@dataclass(frozen=True, eq=False)
class Candidate:
    """One priced placement: seconds per row of one u-batch (PP) and of `tg` tokens (TG)."""

    choice: Choice
    t_pp: np.ndarray
    t_tg: np.ndarray
    pp: "Timeline"
    tg: "Timeline"
    layout: int  # id of its state layout (same id = same devices for every state piece)
    memory_GB: tuple[float, ...]  # per device: this placement alone (weights, caches, compute)
    fits: bool

    @property
    def label(self) -> str:
        return self.choice.name


@dataclass(frozen=True)
class Segment:
    """From depth `start` on, PP runs placement `pp` and TG placement `tg`."""

    start: int
    pp: Choice
    tg: Choice


@dataclass(frozen=True, eq=False)
class AutoPlan:
    """The chosen placements, the workload, and every candidate with its predicted times."""

    segments: tuple[Segment, ...]
    workload: Workload
    devices: tuple[str, ...]
    system: str
    engine: str
    kinds: tuple[str, ...]
    depths: np.ndarray
    candidates: tuple[Candidate, ...]
    chosen_pp: np.ndarray  # seconds per row under the plan (switch cost included)
    chosen_tg: np.ndarray
    reference: Mapping[str, tuple[np.ndarray, np.ndarray]]  # layer / graph: (t_pp, t_tg)
    memory_GB: tuple[float, ...]  # per device, everything the plan keeps resident
    cost: float  # the workload's weighted seconds under the plan
    worst: float  # lowest speed ratio to the better of layer and graph (rows x PP, TG)
    seconds: float = 0.0  # search wall time
    evaluated: int = 0  # placements priced
    notes: tuple[str, ...] = ()
    cfg: ModelConfig | None = field(default=None, repr=False, compare=False)
    picks: tuple[tuple[int, int, int], ...] = ()  # per segment: (first row, PP candidate, TG candidate)
    switch_seconds: tuple[float, ...] = ()  # copies at each switch (charged to that row's TG)
    tg_copies: np.ndarray | None = None  # per row: seconds of state copies in chosen_tg

    def segment(self, depth: float = 0) -> Segment:
        seg = self.segments[0]
        for s in self.segments:
            if depth >= s.start:
                seg = s
        return seg

    def choice(self, phase: str, depth: float = 0) -> Choice:
        if phase not in ("pp", "tg"):
            raise AutoError(f"phase must be pp or tg, got {phase!r}")
        s = self.segment(depth)
        return s.pp if phase == "pp" else s.tg

    def place(self, g: Graph, depth: float = 0) -> Graph:
        """Place an unplaced graph of either phase as the plan does at `depth`."""
        if self.cfg is None:
            raise AutoError("this plan carries no model config to place with")
        phase = str(g.info.get("phase", "pp"))
        return place_choice(g, self.cfg, self.devices, self.choice(phase, depth))

    def placer(self, depth: float = 0) -> Callable[[Graph], Graph]:
        """A `Graph -> Graph` pass for callers that place PP and TG graphs alike (sessions)."""

        def place_auto(g: Graph) -> Graph:
            return self.place(g, depth)

        place_auto.__qualname__ = "place_auto"  # how pipelines and reports name it
        return place_auto

    def speeds(self) -> tuple[np.ndarray, np.ndarray]:
        w = self.workload
        return w.ubatch / self.chosen_pp, w.tg / self.chosen_tg

    def gain(self) -> dict[str, np.ndarray]:
        """Speed of the plan over the better of layer and graph, per row, PP and TG."""
        (lp, lt), (gp, gt) = self.reference["layer"], self.reference["graph"]
        return {"pp": np.minimum(lp, gp) / self.chosen_pp, "tg": np.minimum(lt, gt) / self.chosen_tg}

@dataclass(frozen=True, eq=False)
class AutoResult:
    graph: Graph  # the given graph placed as the plan does for its phase at `depth`
    plan: AutoPlan


__all__ = ["AutoError", "AutoPlan", "AutoResult", "Candidate", "Segment"]
