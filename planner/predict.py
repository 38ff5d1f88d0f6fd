"""Predictions: the llama-sweep-bench table of placed graphs on a system with an engine.

For depth N_KV (REFERENCE §5): T_TG = TG single-token decodes at depths N_KV .. N_KV+TG-1 (the
per-token cost is linear in depth between kinks, so TG x cost at the mean depth), T_PP = one
u-batch of PP tokens on top of N_KV cached tokens. Each row also carries the critical-path
breakdown, per-device utilisation and energy per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from backends.costmodel.options import EngineOptions, apply
from planner.auto import AutoPlan
from planner.auto_report import stitched
from planner.placement import PlaceOptions, auto_placer, parse_placement, place
from planner.workload import DEFAULT_ENGINE, DEFAULT_HW, Workload, WorkloadError
from backends.costmodel.price import Priced, price
from passes.manager import engine_graph
from backends.costmodel.profiles import Engine, load_engine
from hardware.profiles import System, resolve_system
from backends.costmodel.timeline import TERMS, Timeline, evaluate
from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from graphir.models.sources import ModelSource, load_source, weight_scheme, weights_label
from graphir.ops import Op
from reports.progress import track
from graphir.quant import QuantScheme, scheme
from reports.sweep import SweepRow, SweepTable, sweep_shape
from reports.sweep_compare import crossover
from passes.memory import enforce_fit, fit_problem, state_bytes

TERM_LABELS = {"compute": "compute", "weights": "weight bytes", "kv": "KV bytes",
               "activations": "activation/state bytes", "comm": "communication", "launch": "launch/sync"}


@dataclass(frozen=True)
class ModePrediction:
    split: str
    depths: np.ndarray
    pp: Timeline  # one u-batch per depth
    tg: Timeline  # one token per depth (at the mean depth of the TG run)
    workload: Workload
    power: tuple[float, float]  # idle, full-load watts per device
    memory_GB: tuple[float, ...] = ()  # per device: weights + caches at the largest depth

    @property
    def rows(self) -> tuple[SweepRow, ...]:
        w = self.workload
        return tuple(SweepRow.from_times(w.ubatch, w.tg, int(d), float(tp), float(tt) * w.tg, self.split)
                     for d, tp, tt in zip(self.depths, self.pp.total, self.tg.total))

    def table(self) -> SweepTable:
        return SweepTable(self.rows, self.split)

    def dominant(self, phase: str) -> list[str]:
        tl = self.pp if phase == "pp" else self.tg
        return [TERMS[i] for i in np.argmax(tl.terms, axis=0)]

    def utilisation(self, phase: str) -> np.ndarray:
        tl = self.pp if phase == "pp" else self.tg
        return tl.busy / tl.total[None, :]

    def energy_per_token(self, phase: str) -> np.ndarray:
        """Joules per token: idle power all the time plus the load share while busy."""
        tl = self.pp if phase == "pp" else self.tg
        idle, full = self.power
        joules = idle * tl.total * tl.busy.shape[0] + (full - idle) * tl.busy.sum(axis=0)
        return joules / (self.workload.ubatch if phase == "pp" else 1)


@dataclass(frozen=True)
class Prediction:
    model: str
    system: System
    engine: Engine
    workload: Workload
    modes: dict[str, ModePrediction] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    plans: dict[str, Any] = field(default_factory=dict)  # split -> planner.AutoPlan (auto only)
    weights: str = ""  # the weight types priced, as the header says them (sources.weights_label)
    kv_type: str = ""
    notes: tuple[str, ...] = ()  # what the workload was adjusted to (a clamped u-batch)

    def table(self) -> SweepTable:
        return SweepTable(tuple(r for m in self.modes.values() for r in m.rows), self.model)

    def crossover(self, metric: str, a: str = "layer", b: str = "graph") -> float | None:
        """First depth where mode b's speed reaches mode a's (reports.sweep_compare.crossover)."""
        return crossover(self.modes[a].table(), self.modes[b].table(), metric)  # type: ignore[arg-type]

    def speedup(self, metric: str, a: str = "layer", b: str = "graph") -> np.ndarray:
        sa = np.array([r.speed(metric) for r in self.modes[a].rows])  # type: ignore[arg-type]
        sb = np.array([r.speed(metric) for r in self.modes[b].rows])  # type: ignore[arg-type]
        return sb / sa


def memory_per_device(g: Graph, ctx: int, ubatch: int = 512) -> tuple[float, ...]:
    """GB per device of weights and caches (KV at ctx tokens, a sliding layer's at its window
    plus a u-batch; recurrent state)."""
    env = {"T": 1, "KV": ctx}
    states = state_bytes(g, ctx, ubatch)
    out: dict[str, float] = {d: 0.0 for d in g.device_list()}
    for n in g.nodes:
        if n.op == Op.WEIGHT:
            out[n.devices[0]] += n.spec.nbytes_at(env) / 1e9
        elif n.op == Op.STATE_IN:
            out[n.devices[0]] += states[n.name] / 1e9
    return tuple(out.values())


def predict_placed(pp: Priced, tg: Priced, sysm: System, eng: Engine, workload: Workload,
                   split: str = "", memory_GB: tuple[float, ...] = ()) -> ModePrediction:
    """Sweep one placement (priced pp and tg graphs) over the workload's depths."""
    if pp.tokens != workload.ubatch:
        raise WorkloadError(f"pp graph priced for {pp.tokens} tokens, workload u-batch is {workload.ubatch}")
    d = workload.rows()
    return ModePrediction(split, d, evaluate(pp, sysm, eng, d),
                          evaluate(tg, sysm, eng, d + (workload.tg - 1) / 2.0), workload,
                          (sysm.gpu.idle_W, sysm.gpu.tdp_W), memory_GB)


def place_and_price(cfg: ModelConfig, quant: str | QuantScheme | None, kv_type: str, po: PlaceOptions,
                    ubatch: int, passes: Sequence[str] = (), act: str = "f32") -> tuple[Priced, Priced, Graph]:
    """Build, place and price both phases (after the engine's `passes`, activations in the
    engine's `act` type); also returns the placed tg graph (for memory)."""
    out = []
    for phase in ("pp", "tg"):
        opts = BuildOptions(phase=phase, quant=scheme(quant, default="bf16"), kv_type=kv_type,  # type: ignore[arg-type]
                            act_dtype=act, logits="last")  # sweep-bench asks for the last row's logits only
        g = place(cfg, opts, po)
        out.append((price(engine_graph(g, cfg, passes), ubatch), g))
    return out[0][0], out[1][0], out[1][1]


def resolve_quant(src: ModelSource, quant: str | None) -> str | QuantScheme:
    """`--quant`, else the source's own types: every verb's one default (sources.weight_scheme)."""
    return weight_scheme(src, quant)


def select_gpus(sysm: System, n: int | None) -> tuple[str, ...]:
    """The first `n` GPUs of the system (all when None); n outside 1..count is an error."""
    if n is None:
        return sysm.devices
    if not 1 <= n <= sysm.count:
        raise WorkloadError(f"--gpus {n}: {sysm.name} has {sysm.count} GPU(s); use 1..{sysm.count}")
    return sysm.devices[:n]


def fit_check(split: str, devices: Sequence[str], memory_GB: Sequence[float], sysm: System, ctx: int,
              allow_overflow: bool) -> str | None:
    """Raise (passes.memory.MemoryPlanError) when a device's weights and caches exceed its GPU,
    unless `allow_overflow`; then return the one-line problem for a warning."""
    need = {d: gb * 1e9 for d, gb in zip(devices, memory_GB)}
    problem = fit_problem(need, {d: sysm.gpu.mem_GB * 1e9 for d in need}, f"split {split} on {sysm.name} at ctx {ctx}")
    return enforce_fit(problem, allow_overflow, "use a smaller --quant or --ctx, more --gpus")


def predict(model: str, hw: str | System = DEFAULT_HW, engine: str | Engine = DEFAULT_ENGINE,
            quant: str | None = None, kv_type: str = "f16", splits: Sequence[str] = ("layer", "graph"),
            ts: str | Sequence[float] | None = None, max_gpu: int | None = None, recurrent: str = "single",
            workload: Workload | None = None, n_devices: int | None = None,
            allow_overflow: bool = False, options: EngineOptions | None = None,
            passes: Sequence[str] = ()) -> Prediction:
    """Predict the sweep table of `model` on `hw` for each split mode (`options`: the engine's
    own flags, backends.costmodel.options); `passes` run after each mode's placement, and split
    mode "" is the placement of `passes` alone (named after them). A placement that does not
    fit the GPUs is an error unless `allow_overflow` (then a warning)."""
    sysm0 = hw if isinstance(hw, System) else resolve_system(hw)
    eng0 = engine if isinstance(engine, Engine) else load_engine(engine)
    opts = options or EngineOptions()
    wl = workload or Workload()
    ubatch, notes = sweep_shape(wl.ubatch, wl.tg, wl.ctx)
    wl = replace(wl, ubatch=ubatch)
    src = load_source(model)
    q = resolve_quant(src, quant)
    devices = select_gpus(sysm0, n_devices)
    modes: dict[str, ModePrediction] = {}
    warnings: list[str] = []
    plans: dict[str, AutoPlan] = {}
    setups = {split: apply(opts, eng0, sysm0, split) for split in splits}  # refuse bad flags before work
    for split in track(splits, "predict"):
        eng, sysm, extra = setups[split]
        po = parse_placement(split or None, devices, ts, max_gpu, recurrent, passes=passes, hw=sysm, engine=eng,
                             workload=wl)
        if split == "auto":
            modes[split], plans[split] = predict_auto(src.cfg, q, kv_type, po)
            warnings += [f"auto: {x}" for x in plans[split].notes]
            warnings += [w for w in [fit_check(split, devices, modes[split].memory_GB, sysm, wl.ctx,
                                               allow_overflow)] if w]
            continue
        pp, tg, g = place_and_price(src.cfg, q, kv_type, po, wl.ubatch, tuple(eng.passes) + extra, eng.act_dtype)
        split = split or "+".join(passes)
        mem = memory_per_device(g, wl.ctx)
        # before the sweep is evaluated: a context the caches cannot hold stops here
        warnings += [w for w in [fit_check(split, g.device_list(), mem, sysm, wl.ctx, allow_overflow)] if w]
        modes[split] = predict_placed(pp, tg, sysm, eng, wl, split, mem)
    eng, sysm, _ = setups[splits[0]] if splits else (eng0, sysm0, ())  # what the flags make of the rig, for headers
    return Prediction(src.cfg.name or model, sysm, eng, wl, modes, tuple(warnings), plans,
                      weights_label(src, quant), kv_type, notes)


def predict_auto(cfg: ModelConfig, quant: str | QuantScheme, kv_type: str, po: PlaceOptions
                 ) -> tuple[ModePrediction, AutoPlan]:
    """Split mode `auto`: the auto search (planner.placement.AutoPlacer) for this sweep (every
    row alike, PP and TG weighted 1:1) on `po.hw` with `po.engine`; the rows are its plan's,
    switch costs included."""
    eng = po.engine if isinstance(po.engine, Engine) else load_engine(po.engine)
    graphs = {ph: build(cfg, BuildOptions(phase=ph, quant=scheme(quant, default="bf16"), kv_type=kv_type,  # type: ignore[arg-type]
                                          act_dtype=eng.act_dtype, logits="last")) for ph in ("pp", "tg")}
    plan = auto_placer(po, cfg, graphs=graphs).plan_for(graphs["pp"])
    sysm, wl = plan_system(po), po.workload or Workload()
    pp, tg = stitched(plan)
    mode = ModePrediction("auto", plan.depths, pp, tg, wl, (sysm.gpu.idle_W, sysm.gpu.tdp_W), plan.memory_GB)
    return mode, plan


def plan_system(po: PlaceOptions) -> System:
    return po.hw if isinstance(po.hw, System) else resolve_system(po.hw)
