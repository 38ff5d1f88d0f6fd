"""Placement for the cost model: a thin adapter over the project's placement passes.

`place()` builds one phase of a model and places it with `passes.place_layer`,
`passes.place_graph` or `planner.place_auto`; the cost model itself only needs the
placed-graph contract (passes/README.md), so any other placement prices the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, TYPE_CHECKING

from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from passes.devices import PlacementError
from passes.place import place_graph, place_layer

if TYPE_CHECKING:
    from backends.costmodel.profiles import Engine, System
    from planner.auto import AutoWorkload

Split = Literal["layer", "graph", "auto"]
SPLITS: tuple[str, ...] = ("layer", "graph", "auto")


@dataclass(frozen=True)
class PlaceOptions:
    split: Split | None
    devices: tuple[str, ...]
    ts: tuple[float, ...] | None = None  # split ratios per device (default equal)
    max_gpu: int | None = None  # graph split: at most this many devices per layer
    recurrent: Literal["single", "split"] = "single"  # graph split of delta-net layers
    # auto: the system, engine and workload the search minimises for
    hw: "str | System" = "2x3090"
    engine: "str | Engine" = "ik_llama.cpp"
    workload: "AutoWorkload | None" = None
    # passes (registered names or module:function) run after the split's placement; with split
    # None they are the placement (`--pass` of predict and timeline, as `graphir place` runs it)
    passes: tuple[str, ...] = ()


def place(cfg: ModelConfig, opts: BuildOptions, po: PlaceOptions) -> Graph:
    """The placed graph of `cfg` for phase `opts.phase` under split mode `po.split` (auto:
    the placement its plan runs at depth 0)."""
    if not po.devices:
        raise PlacementError("no devices to place on")
    g = build(cfg, opts)
    if po.split == "layer":
        g = place_layer(g, cfg, po.devices, ts=po.ts)
    elif po.split == "graph":
        g = place_graph(g, cfg, po.devices, ts=po.ts, max_gpu=po.max_gpu, recurrent=po.recurrent)
    elif po.split == "auto":
        from planner.auto import place_auto  # the search imports the cost model

        g = place_auto(g, cfg, po.devices, po.workload, po.hw, po.engine, ts=po.ts).graph
    elif po.split is not None or not po.passes:
        raise PlacementError(f"unknown split mode {po.split!r} ({', '.join(SPLITS)})")
    return _user_passes(g, cfg, po) if po.passes else g


def _user_passes(g: Graph, cfg: ModelConfig, po: PlaceOptions) -> Graph:
    from passes.manager import PassContext, run_pipeline

    ctx = PassContext(cfg=cfg, devices=po.devices, ts=po.ts, max_gpu=po.max_gpu, recurrent=po.recurrent)
    g = run_pipeline(g, list(po.passes), ctx).graph
    if not g.placed:
        raise PlacementError(f"--pass {', '.join(po.passes)} left nodes without a device: give --split "
                             f"layer|graph too, or a pass that places the graph")
    return g


def engine_graph(g: Graph, cfg: ModelConfig, passes: Sequence[str]) -> Graph:
    """The graph an engine executes: placed graph `g` after the engine's own passes (registered
    names or module:function, each `g -> g` or `(g, ctx) -> g`)."""
    if not passes:
        return g
    from passes.manager import PassContext, run_pipeline

    # no verify after each pass: the graph is priced on every candidate of auto's search
    return run_pipeline(g, list(passes), PassContext(cfg=cfg, devices=g.device_list()), verify_each=False).graph
