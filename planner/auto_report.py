"""Why `place_auto` chose its plan: the plan, then every candidate with its predicted times.

Also the plan's per-row cost-model timelines (the candidates' timelines stitched per segment),
which `graphir predict --split auto` shows like any other mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.auto_space import KIND_NAMES

if TYPE_CHECKING:
    from backends.costmodel.timeline import Timeline
    from planner.auto import AutoPlan


def _at(plan: "AutoPlan", n_cols: int = 4) -> list[int]:
    """Row indices to show: first, last and a few evenly between."""
    D = len(plan.depths)
    return sorted({int(round(x)) for x in np.linspace(0, D - 1, min(D, n_cols))})


def explain(plan: "AutoPlan") -> str:
    w = plan.workload
    cols = _at(plan)
    kinds = ", ".join(KIND_NAMES[k] for k in plan.kinds)
    lines = [f"auto placement on {plan.system} ({', '.join(plan.devices)}), engine {plan.engine}",
             f"workload: u-batch {w.ubatch}, TG {w.tg}, {len(plan.depths)} depth(s) "
             f"{int(plan.depths[0])}..{int(plan.depths[-1])}, weights PP {w.pp_weight:g} / TG {w.tg_weight:g}; "
             f"layer kinds: {kinds}",
             f"searched {plan.evaluated} placements in {plan.seconds:.2f} s", "", "plan:"]
    for k, s in enumerate(plan.segments):
        end = plan.segments[k + 1].start if k + 1 < len(plan.segments) else None
        rng = f"N_KV {s.start}.." + (f"{end - 1}" if end is not None else "")
        lines.append(f"  {rng:<16} PP: {s.pp.name}")
        lines.append(f"  {'':<16} TG: {s.tg.name}")
    for k, (_, p, t) in enumerate(plan.picks):
        end = plan.picks[k + 1][0] - 1 if k + 1 < len(plan.picks) else len(plan.depths) - 1
        if plan.candidates[p].layout != plan.candidates[t].layout and plan.tg_copies is not None:
            lines.append(f"  from N_KV {plan.segments[k].start}: PP and TG keep their own KV/state layouts; "
                         f"{1e3 * plan.tg_copies[end]:.1f} ms of copies per row keep both current (charged to TG)")
    for k, sec in enumerate(plan.switch_seconds):
        lines.append(f"  switch at N_KV {plan.segments[k + 1].start}: {1e3 * sec:.1f} ms of state copies "
                     f"(charged to that row's TG; older KV rows move in the background)")
    lines.append("  memory per device: " + ", ".join(f"{gb:.1f} GB" for gb in plan.memory_GB))
    gain = plan.gain()
    for ph in ("pp", "tg"):
        g = gain[ph]
        lines.append(f"  {ph.upper()} vs the better of layer and graph: x{g.min():.3f} .. x{g.max():.3f} "
                     f"(" + ", ".join(f"N_KV {int(plan.depths[c])}: x{g[c]:.3f}" for c in cols) + ")")
    lines += [f"  note: {x}" for x in plan.notes]
    w_pp, w_tg = w.weights()
    lines += ["", f"candidates (workload time: the weighted PP + TG seconds of all rows if this placement "
              f"ran both phases everywhere; the plan's: {plan.cost:.2f} s; speed in t/s at N_KV = "
              + ", ".join(str(int(plan.depths[c])) for c in cols) + "; memory in GB per device; "
              "* = in the plan):", ""]
    head = "| # | placement | workload s | fits | memory | PP t/s | TG t/s |"
    lines += [head, "|---|---|---:|---|---|---|---|"]
    used = {c for _, p, t in plan.picks for c in (p, t)}
    for i, c in enumerate(plan.candidates):
        pp = "/".join(f"{w.ubatch / c.t_pp[j]:.0f}" for j in cols)
        tg = "/".join(f"{w.tg / c.t_tg[j]:.1f}" for j in cols)
        mem = "/".join(f"{x:.1f}" for x in c.memory_GB)
        cost = float((w_pp * c.t_pp + w_tg * c.t_tg).sum())
        mark = "*" if i in used else ""
        lines.append(f"| {i}{mark} | {c.label} | {cost:.2f} | {'yes' if c.fits else 'no'} | {mem} | {pp} | {tg} |")
    return "\n".join(lines) + "\n"


def stitched(plan: "AutoPlan") -> tuple["Timeline", "Timeline"]:
    """Per-row PP and TG timelines of the plan (TG per token; state copies, at a switch or to
    keep two layouts current, spread over the row's decode run as communication)."""
    from backends.costmodel.timeline import Timeline

    D = len(plan.depths)
    out = []
    for ph in ("pp", "tg"):
        src = np.zeros(D, dtype=int)
        for r, p, t in plan.picks:
            src[r:] = p if ph == "pp" else t
        tls = [getattr(c, ph) for c in plan.candidates]
        cols = np.arange(D)
        total = np.array([tls[src[j]].total[j] for j in cols])
        terms = np.stack([tls[src[j]].terms[:, j] for j in cols], axis=1)
        busy = np.stack([tls[src[j]].busy[:, j] for j in cols], axis=1)
        work = {k: np.array([tls[src[j]].work[k][j] for j in cols]) for k in tls[0].work}
        if ph == "tg" and plan.tg_copies is not None:
            extra = plan.tg_copies / plan.workload.tg  # state copies, per decoded token of the run
            total = total + extra
            terms[4] += extra
        out.append(Timeline(total, terms, busy, work))
    return out[0], out[1]
