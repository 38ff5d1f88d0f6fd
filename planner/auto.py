"""`place_auto`: search the placement space per layer kind for the fastest predicted workload.

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
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.models.config import ModelConfig

from planner.auto_space import Choice, place_choice
from passes.manager import PassContext, register_pass

if TYPE_CHECKING:  # the cost model is imported when a search runs (it imports passes itself)
    from backends.costmodel.profiles import Engine, System
    from backends.costmodel.timeline import Timeline


class AutoError(GraphirError):
    """A workload or search request place_auto cannot honour (bad sizes, nothing fits)."""


@dataclass(frozen=True)
class AutoWorkload:
    """What to minimise: per depth N_KV (a sweep-bench row), `pp_weight` x the seconds of one
    u-batch of PP plus `tg_weight` x the seconds of `tg` decoded tokens, times the depth's
    weight. Defaults: sweep-bench's rows 0, ub, 2 ub, ... < ctx, every row alike."""

    ubatch: int = 2048
    tg: int = 128
    ctx: int = 98304  # KV cache size (memory) and, without `depths`, the sweep's end
    depths: tuple[int, ...] = ()
    pp_weight: float = 1.0
    tg_weight: float = 1.0
    depth_weights: tuple[float, ...] = ()  # one per depth; () = uniform

    def __post_init__(self) -> None:
        if self.ubatch <= 0 or self.tg <= 0 or self.ctx <= 0:
            raise AutoError(f"u-batch, tg and ctx must be positive (got {self.ubatch}, {self.tg}, {self.ctx})")
        if self.pp_weight < 0 or self.tg_weight < 0 or self.pp_weight + self.tg_weight <= 0:
            raise AutoError(f"PP and TG weights must be >= 0 and not both 0 (got {self.pp_weight}, {self.tg_weight})")
        if any(d < 0 or d >= self.ctx for d in self.depths):
            raise AutoError(f"depths must lie in [0, ctx={self.ctx}); got {list(self.depths)}")
        if self.depth_weights and len(self.depth_weights) != len(self.rows()):
            raise AutoError(f"{len(self.depth_weights)} depth weight(s) for {len(self.rows())} depth(s)")
        if any(w < 0 for w in self.depth_weights):
            raise AutoError("depth weights must be >= 0")

    def rows(self) -> np.ndarray:
        if self.depths:
            return np.array(sorted(self.depths), dtype=float)
        return np.arange(0, self.ctx, self.ubatch, dtype=float)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Weight of each row's PP seconds and TG seconds."""
        dw = np.array(self.depth_weights, dtype=float) if self.depth_weights else np.ones(len(self.rows()))
        return self.pp_weight * dw, self.tg_weight * dw


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
    workload: AutoWorkload
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

    def explain(self) -> str:
        from planner.auto_report import explain

        return explain(self)


@dataclass(frozen=True, eq=False)
class AutoResult:
    graph: Graph  # the given graph placed as the plan does for its phase at `depth`
    plan: AutoPlan


def place_auto(g: Graph, cfg: ModelConfig, devices: Sequence[str] | str | int,
               workload: AutoWorkload | None = None, hw: "str | System" = "2x3090",
               engine: "str | Engine" = "ik_llama.cpp", *, graphs: Mapping[str, Graph] | None = None,
               ts: Sequence[float] | None = None, depth: float = 0, guard: float = 0.99,
               max_segments: int = 3, tolerance: float = 0.005,
               reduce_dtypes: Sequence[str | None] = (None, "f16")) -> AutoResult:
    """Search placements of `g` (unplaced, either phase) for `workload` on `hw` with `engine`.

    `graphs` may hold the other phase's unplaced graph (else it is rebuilt from `g`'s own
    weight types). `ts` seeds the home layers per device (default equal). `guard`: prefer
    plans no slower than this fraction of the better of layer and graph split at any row;
    `tolerance`: take a simpler plan (one placement, shared weights) within this cost
    fraction of the best; `max_segments`: depth ranges with their own placements (1: none)."""
    from planner.auto_search import search

    plan = search(g, cfg, devices, workload or AutoWorkload(), hw, engine, graphs=graphs, ts=ts, guard=guard,
                  max_segments=max_segments, tolerance=tolerance, reduce_dtypes=tuple(reduce_dtypes))
    return AutoResult(plan.place(g, depth), plan)


@register_pass("place_auto")
def place_auto_pass(g: Graph, ctx: PassContext) -> Graph:
    """Auto split: the plan's placement for this phase (options: hw, engine, workload, depth)."""
    wl = ctx.option("workload") or AutoWorkload(ubatch=ctx.ubatch, ctx=ctx.ctx_len)
    res = place_auto(g, ctx.require_cfg("place_auto"), ctx.devices, wl, ctx.option("hw", "2x3090"),
                     ctx.option("engine", "ik_llama.cpp"), ts=ctx.ts, depth=ctx.option("depth", 0))
    return res.graph


__all__ = ["AutoError", "AutoPlan", "AutoResult", "AutoWorkload", "Candidate", "Segment", "place_auto"]
