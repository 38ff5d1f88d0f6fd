"""One placement spec, parsed once, and the one placer every verb and the cost model use.

`PlaceOptions` is what a user says about placement: the split mode (layer, graph, auto, or
none when passes place), the devices, split ratios, devices per layer, where delta-net layers
go, and the passes after the placement. `parse_placement` is its one parser: every verb's
`--split`, `--ts`, `--max-gpu` and `--recurrent` end there (`parse_splits` reads predict's
list of modes). `placement_pass` is the one dispatch from a split mode to the pass that
places: the registered `place_layer` / `place_graph` (they read ratios, `--mem` and the
reduce type from the PassContext) or an `AutoPlacer`, the one entry of the auto search.
`place()` builds one phase and places it, for the cost model; `placer()` gives the same
placement as `Graph -> Graph` functions, for sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from backends.costmodel.profiles import Engine
from hardware.profiles import System
from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from passes.devices import PlacementError, parse_ts
from passes.manager import PassContext, PassSpec, call_pass, register_pass, resolve, run_pipeline
from planner.auto import AutoPlan
from planner.auto_search import place_auto
from planner.workload import DEFAULT_ENGINE, DEFAULT_HW, Workload

Split = Literal["layer", "graph", "auto"]
SPLITS: tuple[str, ...] = ("layer", "graph", "auto")
RECURRENT: tuple[str, ...] = ("single", "split")


@dataclass(frozen=True)
class PlaceOptions:
    split: Split | None
    devices: tuple[str, ...]
    ts: tuple[float, ...] | None = None  # split ratios per device (default equal)
    max_gpu: int | None = None  # graph split: at most this many devices per layer
    recurrent: Literal["single", "split"] = "single"  # graph split of delta-net layers
    # auto: the system, engine and workload the search minimises for
    hw: "str | System" = DEFAULT_HW
    engine: "str | Engine" = DEFAULT_ENGINE
    workload: Workload | None = None
    # passes (registered names or module:function) run after the split's placement; with split
    # None they are the placement (`--pass` of predict and timeline, as `graphir place` runs it)
    passes: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # however it is made, a spec that makes no sense stops here
        if self.split is not None and self.split not in SPLITS:
            raise PlacementError(f"unknown split mode {self.split!r}: --split must be layer or graph (or auto)")
        if self.recurrent not in RECURRENT:
            raise PlacementError(f"--recurrent must be single or split, got {self.recurrent!r}")
        if self.max_gpu is not None and self.max_gpu < 1:
            raise PlacementError(f"--max-gpu must be at least 1, got {self.max_gpu}")
        if not self.devices:
            raise PlacementError("no devices to place on")

    def context(self, cfg: ModelConfig | None, **kw: Any) -> PassContext:
        """The PassContext of this placement (`kw`: mem, ctx_len, ubatch, reduce_dtype, options)."""
        return PassContext(cfg=cfg, devices=self.devices, ts=self.ts, max_gpu=self.max_gpu,
                           recurrent=self.recurrent, **kw)


def parse_placement(split: str | None, devices: Sequence[str], ts: str | Sequence[float] | None = None,
                    max_gpu: int | None = None, recurrent: str = "single", *, passes: Sequence[str] = (),
                    hw: "str | System" = DEFAULT_HW, engine: "str | Engine" = DEFAULT_ENGINE,
                    workload: Workload | None = None) -> PlaceOptions:
    """The placement options of a command line as one spec (`ts` as given: `3,1` or numbers),
    refused with one line when they make no sense."""
    ratios = parse_ts(ts, len(devices)) if devices and ts is not None and ts != "" else None
    return PlaceOptions(split, tuple(devices), ratios, max_gpu, recurrent, hw, engine, workload,  # type: ignore[arg-type]
                        tuple(passes))


def parse_splits(text: str) -> tuple[str, ...]:
    """Comma-separated split modes (predict compares several)."""
    out = tuple(s.strip() for s in text.split(",") if s.strip())
    if not out or any(s not in SPLITS for s in out):
        raise PlacementError(f"--split takes layer, graph and/or auto (comma separated), got {text!r}")
    return out


@dataclass(eq=False)
class AutoPlacer:
    """The one entry of the auto search: searched once, on the first graph it places, for
    `workload` on `hw` with `engine`; every graph (either phase) is then placed as the plan
    does at `depth`. `graphs` may hold both phases' unplaced graphs (else the search rebuilds
    the other phase). A plan with depth ranges places its `depth` range's placements:
    switching layouts mid-sweep is priced by the cost model, not executed."""

    cfg: ModelConfig
    devices: tuple[str, ...]
    workload: Workload = field(default_factory=Workload)
    hw: "str | System" = DEFAULT_HW
    engine: "str | Engine" = DEFAULT_ENGINE
    ts: tuple[float, ...] | None = None
    depth: float = 0
    graphs: Mapping[str, Graph] | None = None
    plan: AutoPlan | None = None

    def plan_for(self, g: Graph) -> AutoPlan:
        if self.plan is None:
            self.plan = place_auto(g, self.cfg, self.devices, self.workload, self.hw, self.engine,
                                   graphs=self.graphs, ts=self.ts).plan
        return self.plan

    def __call__(self, g: Graph) -> Graph:
        return self.plan_for(g).place(g, self.depth)

    def as_pass(self) -> Callable[[Graph], Graph]:
        """This placer as a pass named `place_auto` (how pipelines and reports name it); the
        pass carries the placer (`.placer`) so that callers find the searched plan."""

        def place_auto(g: Graph) -> Graph:
            return self(g)

        place_auto.placer = self  # type: ignore[attr-defined]
        return place_auto


def auto_placer(po: PlaceOptions, cfg: ModelConfig, depth: float = 0,
                graphs: Mapping[str, Graph] | None = None) -> AutoPlacer:
    return AutoPlacer(cfg, po.devices, po.workload or Workload(), po.hw, po.engine, po.ts, depth, graphs)


def placement_pass(po: PlaceOptions, cfg: ModelConfig, depth: float = 0) -> PassSpec | None:
    """The pass that places an unplaced graph as `po.split` says; None: the passes place."""
    if po.split == "auto":
        return auto_placer(po, cfg, depth).as_pass()
    return f"place_{po.split}" if po.split else None


def pipeline(po: PlaceOptions, cfg: ModelConfig, depth: float = 0) -> tuple[PassSpec, ...]:
    """The placement, then `po.passes` in the order given."""
    first = placement_pass(po, cfg, depth)
    return ((first,) if first is not None else ()) + po.passes


def placer(po: PlaceOptions, cfg: ModelConfig, ctx: PassContext | None = None) -> list[Callable[[Graph], Graph]]:
    """The pipeline as `Graph -> Graph` functions (a session's transform), one per pass."""
    pctx = ctx or po.context(cfg)
    out: list[Callable[[Graph], Graph]] = []
    for spec in pipeline(po, cfg):
        _, fn = resolve(spec)
        out.append(fn if callable(spec) else (lambda g, fn=fn: call_pass(fn, g, pctx)))
    return out


def searched_plan(passes: Sequence[Any]) -> AutoPlan | None:
    """The auto plan a pipeline's placer searched (None: no auto placement, or not run yet)."""
    found = [p.placer.plan for p in passes if getattr(p, "placer", None) is not None]
    return found[0] if found else None


def place(cfg: ModelConfig, opts: BuildOptions, po: PlaceOptions) -> Graph:
    """The placed graph of `cfg` for phase `opts.phase` under split mode `po.split` (auto:
    the placement its plan runs at depth 0)."""
    if po.split is None and not po.passes:
        raise PlacementError(f"no split mode and no passes to place with ({', '.join(SPLITS)})")
    g = build(cfg, opts)
    first = placement_pass(po, cfg)
    ctx = po.context(cfg)
    if first is not None:  # the placement itself is not verified: the placers' own tests do that
        g = call_pass(resolve(first)[1], g, ctx)
    if po.passes:
        g = run_pipeline(g, list(po.passes), ctx).graph
        if not g.placed:
            raise PlacementError(f"--pass {', '.join(po.passes)} left nodes without a device: give --split "
                                 f"layer|graph too, or a pass that places the graph")
    return g


@register_pass("place_auto")
def place_auto_pass(g: Graph, ctx: PassContext) -> Graph:
    """Auto split: the plan's placement for this phase (options: hw, engine, workload, depth)."""
    wl = ctx.option("workload") or Workload(ubatch=ctx.ubatch, ctx=ctx.ctx_len)
    return AutoPlacer(ctx.require_cfg("place_auto"), ctx.devices, wl, ctx.option("hw", DEFAULT_HW),
                      ctx.option("engine", DEFAULT_ENGINE), ctx.ts, ctx.option("depth", 0))(g)
