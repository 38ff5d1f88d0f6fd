"""The search behind `place_auto`: price candidates once, evaluate every depth at once, prune.

Each candidate placement is placed and priced once per phase (`backends.costmodel.price`:
per-node coefficients linear in KV), then `evaluate` gives every row of the workload in one
vectorised pass. The space is walked in stages, each on the best few of the last:
layer kinds (which split), split groups, split ratios, home layers (only when memory needs
it), reduce type of TG partials; then plans pair and sequence the priced candidates.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from graphir.graph import Graph
from graphir.models import BuildOptions, build
from graphir.models.config import ModelConfig
from graphir.ops import Op
from reports.progress import bar
from graphir.quant import per_tensor, scheme

from planner.auto import AutoError, AutoPlan, AutoResult, Candidate, Segment
from planner.workload import DEFAULT_ENGINE, DEFAULT_HW, Workload
from planner.auto_memory import ResidentMemory
from planner.auto_plan import Problem, StatePiece, choose, migration_bytes
from passes.regions import RegionCache, head_splittable, region_plan
from planner.auto_space import (Choice, graph_choice, home_counts, layer_choice, model_kinds, place_choice,
                               state_layout, state_piece)
from passes.devices import parse_devices
from passes.manager import engine_graph
from passes.regions import sections

if TYPE_CHECKING:
    from backends.costmodel.profiles import Engine
    from hardware.profiles import System


def other_phase(g: Graph, cfg: ModelConfig) -> Graph:
    """The other phase's unplaced graph, with `g`'s own weight and cache types."""
    info = g.info
    types = {n.name: n.spec.dtype for n in g.nodes if n.op == Op.WEIGHT}
    quant = per_tensor(types, scheme(str(info.get("quant", "bf16")), default="bf16"), label=str(info.get("quant", "")))
    phase = "tg" if info.get("phase", "pp") == "pp" else "pp"
    # a PP graph that keeps all rows' logits has no `output_last`; a TG graph cannot tell, and
    # sweep-bench (what the workload mirrors) asks for the last row only
    logits = "all" if g.info.get("phase", "pp") == "pp" and "output_last" not in g else "last"
    opts = BuildOptions(phase=phase, act_dtype=str(info.get("act", "f32")), quant=quant,  # type: ignore[arg-type]
                        kv_type=str(info.get("kv_type", "f16")), logits=logits)
    # the same layer range as `g` (a `--layers A:B` graph keeps its layers' original indices)
    layers = [i for i, _ in sections(g)[1]]
    return build(cfg, opts, range(layers[0], layers[-1] + 1) if layers else None)


class Search:
    """The priced candidates of one search and the stages that add them."""

    def __init__(self, graphs: dict[str, Graph], cfg: ModelConfig, devices: tuple[str, ...], wl: Workload,
                 sysm: "System", eng: "Engine") -> None:
        self.graphs, self.cfg, self.devices, self.wl, self.sysm, self.eng = graphs, cfg, devices, wl, sysm, eng
        self.rows = wl.rows()
        self.w_pp, self.w_tg = wl.weights()
        self.layers = [i for i, _ in sections(graphs["pp"])[1]]
        self.kinds = model_kinds(cfg, self.layers)
        cap = int(sysm.gpu.mem_GB * 1e9)
        self.mem = ResidentMemory(devices, tuple(cap for _ in devices), wl.ctx, wl.ubatch)
        self.cands: list[Candidate] = []
        self.by_choice: dict[Choice, int] = {}
        self.by_plan: dict[tuple, int] = {}
        self.tick: Callable[[str], None] = lambda name: None  # called once per placement priced
        self.region_cache: dict[str, RegionCache] = {"pp": {}, "tg": {}}
        self.layouts: dict[tuple, int] = {}
        self.layout_pieces: list[list[StatePiece]] = []

    def ev(self, ch: Choice) -> int:
        """Index of the priced candidate for `ch` (placed and priced once)."""
        if ch in self.by_choice:
            return self.by_choice[ch]
        # choices that differ only in ratios the granules cannot follow place identically
        key = (region_plan(self.graphs["pp"], self.cfg, self.devices,
                           ch.assignment(self.cfg, len(self.devices), self.layers)), ch.reduce_dtype, ch.head_split)
        if key in self.by_plan:
            self.by_choice[ch] = self.by_plan[key]
            return self.by_plan[key]
        from backends.costmodel.price import price
        from backends.costmodel.timeline import evaluate

        placed = {ph: place_choice(g, self.cfg, self.devices, ch, self.region_cache[ph])
                  for ph, g in self.graphs.items()}
        run = {ph: engine_graph(g, self.cfg, self.eng.passes) for ph, g in placed.items()}  # what executes
        tl_pp = evaluate(price(run["pp"], self.wl.ubatch), self.sysm, self.eng, self.rows)
        tl_tg = evaluate(price(run["tg"]), self.sysm, self.eng, self.rows + (self.wl.tg - 1) / 2.0)
        self.tick(ch.name)
        lay = state_layout(placed["pp"])
        if lay != state_layout(placed["tg"]):
            raise AutoError(f"placement {ch.name}: PP and TG graphs put state in different places")
        if lay not in self.layouts:
            self.layouts[lay] = len(self.layouts)
            self.layout_pieces.append(_state_pieces(placed["pp"]))
        k = self.mem.add([placed["pp"]])  # same pieces as TG; PP has the larger compute buffer
        mp = self.mem.plan((k,))
        gb = tuple(d.total / 1e9 for d in mp.devices)
        c = Candidate(ch, tl_pp.total, tl_tg.total * self.wl.tg, tl_pp, tl_tg, self.layouts[lay], gb,
                      self.mem.fits((k,)))
        self.cands.append(c)
        self.by_choice[ch] = self.by_plan[key] = len(self.cands) - 1
        return self.by_choice[ch]

    def cost(self, i: int, phase: str) -> float:
        c = self.cands[i]
        j = float((self.w_pp * c.t_pp).sum()) if phase != "tg" else 0.0
        return j + (float((self.w_tg * c.t_tg).sum()) if phase != "pp" else 0.0)

    def best(self, phase: str, k: int = 1, pool: Sequence[int] | None = None) -> list[int]:
        pool = list(pool if pool is not None else range(len(self.cands)))
        fit = [i for i in pool if self.cands[i].fits] or pool
        return sorted(fit, key=lambda i: (self.cost(i, phase), i))[:k]

    # ---- stages ------------------------------------------------------------------------------
    def kinds_stage(self, home: tuple[int, ...]) -> None:
        n = len(self.devices)
        eq = tuple(1.0 for _ in range(n))
        if len(self.kinds) <= 3:
            for r in range(len(self.kinds) + 1):
                for sub in itertools.combinations(self.kinds, r):
                    self.ev(Choice(sub, home, eq))
            return
        for start in (layer_choice(home, n), graph_choice(self.kinds, home, n)):
            cur = self.ev(start)
            for _ in range(2):  # coordinate descent over kinds, twice
                for kind in self.kinds:
                    ch = self.cands[cur].choice
                    flip = tuple(k for k in self.kinds if (k in ch.split) != (k == kind))
                    alt = self.ev(ch.with_(split=flip))
                    if self.cost(alt, "all") < self.cost(cur, "all"):
                        cur = alt

    def targets(self) -> list[int]:
        """The candidates worth refining: best for PP, for TG and for both, with a split."""
        split = [i for i in range(len(self.cands)) if self.cands[i].choice.split]
        out: list[int] = []
        for ph in ("pp", "tg", "all"):
            for i in self.best(ph, 1, split):
                if i not in out:
                    out.append(i)
        return out

    def groups_stage(self) -> None:
        n = len(self.devices)
        for i in self.targets():
            for gs in range(2, n):
                if n % gs == 0:
                    self.ev(self.cands[i].choice.with_(group=gs))

    def ratios_stage(self) -> None:
        """Hill-climb the split ratios of the best PP and TG candidates, one device against the
        first (uneven head or granule counts, e.g. an odd number of KV heads)."""
        n = len(self.devices)
        for ph in ("pp", "tg"):
            split = [i for i in range(len(self.cands)) if self.cands[i].choice.split]
            for cur in self.best(ph, 1, split):
                if self.balanced(self.cands[cur].choice):
                    continue
                for j in range(1, n):
                    for step in (0.25, 0.1):
                        for sgn in (1.0, -1.0):
                            r = list(self.cands[cur].choice.ratios)
                            r[j] = round(r[j] * (1 + sgn * step), 6)
                            alt = self.ev(self.cands[cur].choice.with_(ratios=tuple(r)))
                            if self.cands[alt].fits and self.cost(alt, ph) < self.cost(cur, ph) * (1 - 1e-9):
                                cur = alt
                                break

    def balanced(self, ch: Choice) -> bool:
        """Every split region cut into equal parts: on identical GPUs uneven ratios only move
        work onto one device, so they are tried only where granules do not divide evenly."""
        if any(r != ch.ratios[0] for r in ch.ratios):
            return False
        plan = region_plan(self.graphs["pp"], self.cfg, self.devices,
                           ch.assignment(self.cfg, len(self.devices), self.layers))
        for _, m, f in plan.layers:
            for reg in (m, f):
                for _, sh in reg.shares:
                    sizes = {b - a for a, b in (r for r in sh.ranges if r is not None)}
                    if len(sh.devices) > 1 and len(sizes) > 1:
                        return False
        return True

    def home_stage(self) -> None:
        """When the best placements overflow a device, move whole layers off it (while that
        lowers the fullest device; never when the devices together are too small)."""
        n, cap = len(self.devices), self.sysm.gpu.mem_GB
        for ph in ("pp", "tg", "all"):
            top = sorted(range(len(self.cands)), key=lambda i: (self.cost(i, ph), i))[:2]
            for i in top:
                c = self.cands[i]
                if c.fits or sum(c.memory_GB) > n * cap:
                    continue
                home = list(c.choice.home)
                for _ in range(6):
                    over = int(np.argmax(np.array(c.memory_GB)))
                    nb = over + 1 if over + 1 < n else over - 1
                    if nb < 0 or home[over] <= 1:
                        break
                    home[over] -= 1
                    home[nb] += 1
                    k = self.ev(c.choice.with_(home=tuple(home)))
                    if max(self.cands[k].memory_GB) >= max(c.memory_GB):
                        break
                    c = self.cands[k]
                    if c.fits:
                        break

    def head_stage(self) -> None:
        """Vocabulary-parallel head on the best PP and TG candidates (decode reads the whole
        head weight for one token; split, each device reads its rows)."""
        if not head_splittable(self.graphs["pp"]) or not head_splittable(self.graphs["tg"]):
            return
        for ph in ("tg", "pp"):
            for i in self.best(ph, 1):
                self.ev(self.cands[i].choice.with_(head_split=True))

    def reduce_stage(self, dtypes: Sequence[str | None]) -> None:
        for i in self.best("tg", 2, [i for i in range(len(self.cands)) if self.cands[i].choice.split]):
            for dt in dtypes:
                self.ev(self.cands[i].choice.with_(reduce_dtype=dt))

    def copy_seconds(self, a: int, b: int, rows: int) -> float:
        """Seconds of the copies that bring state layout b up to date from layout a (`rows` KV
        rows, mutable state in full), with the cost model's copy formula (timeline.comm_costs:
        hops x (latency + bytes / rate) + the engine's per-copy cost), one copy per piece."""
        if a == b:
            return 0.0
        from backends.costmodel.timeline import copy_seconds

        nbytes = migration_bytes(self.layout_pieces[a], self.layout_pieces[b], rows)
        return float(sum(copy_seconds(x, self.sysm, self.eng) + self.eng.copy_us * 1e-6 for x in nbytes))

    def dual_seconds(self, a: int, b: int) -> float:
        """Per row, PP layout a and TG layout b kept both current: the PP's u-batch rows and the
        state into b before the TG, the TG's rows and state back into a after it."""
        return self.copy_seconds(a, b, self.wl.ubatch) + self.copy_seconds(b, a, self.wl.tg)

    def switch_seconds(self, a: int, b: int) -> float:
        return self.copy_seconds(a, b, self.wl.ubatch)


def _state_pieces(g: Graph) -> list[StatePiece]:
    """Each state piece of a placed graph with its bytes at no depth and per cached token."""
    out = []
    for n in g.nodes:
        if n.op == Op.STATE_IN:
            a0 = n.spec.nbytes_at({"KV": 0, "T": 1})
            out.append(StatePiece(state_piece(n), a0, n.spec.nbytes_at({"KV": 1, "T": 1}) - a0))
    return sorted(out, key=lambda p: p.piece)


def search(g: Graph, cfg: ModelConfig, devices: Sequence[str] | str | int, wl: Workload,
           hw: "str | System", engine: "str | Engine", *, graphs: dict[str, Graph] | None, ts: Sequence[float] | None,
           guard: float, max_segments: int, tolerance: float, reduce_dtypes: tuple[str | None, ...]) -> AutoPlan:
    from backends.costmodel.profiles import Engine, load_engine
    from hardware.profiles import System, resolve_system

    t0 = time.perf_counter()
    sysm = hw if isinstance(hw, System) else resolve_system(hw)
    eng = engine if isinstance(engine, Engine) else load_engine(engine)
    devs = parse_devices(devices) if isinstance(devices, (str, int)) else tuple(devices)
    if len(devs) > sysm.count:
        raise AutoError(f"{len(devs)} devices but {sysm.name} has {sysm.count} GPU(s)")
    if max_segments < 1:
        raise AutoError(f"max_segments must be at least 1, got {max_segments}")
    gs = dict(graphs or {})
    gs.setdefault(str(g.info.get("phase", "pp")), g)
    for ph in ("pp", "tg"):
        if ph not in gs:
            gs[ph] = other_phase(next(iter(gs.values())), cfg)
    S = Search({"pp": gs["pp"], "tg": gs["tg"]}, cfg, devs, wl, sysm, eng)
    n = len(devs)
    home = home_counts(cfg, n, S.layers, tuple(ts) if ts else tuple(1.0 for _ in range(n)))
    with bar("auto: placements priced") as b:  # silent unless stderr is a terminal
        S.tick = lambda name: (b.advance(), b.update(note=name))
        S.kinds_stage(home)
        li, gi = S.ev(layer_choice(home, n)), S.ev(graph_choice(S.kinds, home, n))
        if n > 2:
            S.groups_stage()
        if n > 1:
            S.ratios_stage()
        S.home_stage()
        if n > 1:
            S.head_stage()
        S.reduce_stage([d for d in reduce_dtypes if d])
    return _plan(S, li, gi, guard, max_segments, tolerance, time.perf_counter() - t0)


def _plan(S: Search, li: int, gi: int, guard: float, max_segments: int, tolerance: float, t_search: float) -> AutoPlan:
    cands = S.cands
    t_pp = np.stack([c.t_pp for c in cands])
    t_tg = np.stack([c.t_tg for c in cands])
    ref_pp = 1.0 / np.minimum(t_pp[li], t_pp[gi])
    ref_tg = 1.0 / np.minimum(t_tg[li], t_tg[gi])
    weights = [frozenset(int(x) for x in S.mem.per_cand[i] if S.mem.kind[x] == 0) for i in range(len(cands))]
    memo: dict[tuple[str, int, int], float] = {}

    def cached(kind: str, a: int, b: int) -> float:
        if (kind, a, b) not in memo:
            memo[(kind, a, b)] = S.dual_seconds(a, b) if kind == "dual" else S.switch_seconds(a, b)
        return memo[(kind, a, b)]

    def problem(fits: Callable[[tuple[int, ...]], bool]) -> Problem:
        return Problem(t_pp, t_tg, [c.layout for c in cands], S.w_pp, S.w_tg, ref_pp, ref_tg,
                       lambda a, b: cached("dual", a, b), lambda a, b: cached("switch", a, b), fits,
                       lambda p, t: weights[p] == weights[t])

    def used(sc: object) -> tuple[int, ...]:
        return tuple(sorted({c for _, p, t in sc.segments for c in (p, t)}))  # type: ignore[attr-defined]

    notes: list[str] = []
    best = choose(problem(S.mem.fits), guard, tolerance, max_segments)
    if best is not None and not S.mem.fits(used(best)):  # the DP checks neighbouring ranges only
        best = choose(problem(S.mem.fits), guard, tolerance, min(2, max_segments))
    if best is None:
        notes.append(f"no placement fits {S.sysm.gpu.mem_GB:g} GB per GPU at ctx {S.wl.ctx}: "
                     "the plan below ignores memory")
        best = choose(problem(lambda _: True), guard, tolerance, max_segments)
    assert best is not None
    if best.worst < guard:
        notes.append(f"no plan keeps every row within {guard:.0%} of the better of layer and graph split "
                     f"(best worst row {best.worst:.1%})")
    segs = tuple(Segment(0 if k == 0 else int(S.rows[r]), cands[p].choice, cands[t].choice)
                 for k, (r, p, t) in enumerate(best.segments))
    mem = S.mem.plan(used(best))
    switch = tuple(sum(cached("switch", cands[a[1]].layout, lb) for lb in dict.fromkeys((cands[b[1]].layout,
                                                                                     cands[b[2]].layout)))
                   for a, b in zip(best.segments, best.segments[1:]))
    src = np.zeros(len(S.rows), dtype=int)
    for r, _, t in best.segments:
        src[r:] = t
    extra = best.t_tg - t_tg[src, np.arange(len(S.rows))]  # state copies charged to TG
    return AutoPlan(segs, S.wl, S.devices, S.sysm.name, S.eng.name, S.kinds, S.rows, tuple(cands),
                    best.t_pp, best.t_tg, {"layer": (t_pp[li], t_tg[li]), "graph": (t_pp[gi], t_tg[gi])},
                    tuple(d.total / 1e9 for d in mem.devices), best.cost, best.worst, t_search, len(cands),
                    tuple(notes), S.cfg, best.segments, switch, extra)


def place_auto(g: Graph, cfg: ModelConfig, devices: Sequence[str] | str | int,
               workload: Workload | None = None, hw: "str | System" = DEFAULT_HW,
               engine: "str | Engine" = DEFAULT_ENGINE, *, graphs: Mapping[str, Graph] | None = None,
               ts: Sequence[float] | None = None, depth: float = 0, guard: float = 0.99,
               max_segments: int = 3, tolerance: float = 0.005,
               reduce_dtypes: Sequence[str | None] = (None, "f16")) -> AutoResult:
    """Search placements of `g` (unplaced, either phase) for `workload` on `hw` with `engine`.

    `graphs` may hold the other phase's unplaced graph (else it is rebuilt from `g`'s own
    weight types). `ts` seeds the home layers per device (default equal). `guard`: prefer
    plans no slower than this fraction of the better of layer and graph split at any row;
    `tolerance`: take a simpler plan (one placement, shared weights) within this cost
    fraction of the best; `max_segments`: depth ranges with their own placements (1: none)."""
    plan = search(g, cfg, devices, workload or Workload(), hw, engine, graphs=graphs, ts=ts, guard=guard,
                  max_segments=max_segments, tolerance=tolerance, reduce_dtypes=tuple(reduce_dtypes))
    return AutoResult(plan.place(g, depth), plan)
