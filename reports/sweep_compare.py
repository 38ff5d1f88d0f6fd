"""Two llama-sweep-bench tables side by side: measured against predicted speed per depth, with
error statistics (`compare`), and the depth where one mode overtakes another (`crossover`).
Rows align on N_KV (and on split where both tables name splits); reading and writing the
tables is sweep.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from reports.sweep import Metric, SweepRow, SweepTable, TableError


def _quantile(xs: Sequence[float], p: float) -> float:
    """Quantile of sorted xs with linear interpolation (numpy's default method)."""
    pos = p * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    # the equality test keeps inf - inf (two infinite errors) from turning into nan
    return xs[lo] if xs[hi] == xs[lo] else xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def error_stats(errors: Sequence[float]) -> dict[str, float]:
    """Median, p90 and max of |error|, and the count (nan statistics when empty)."""
    xs = sorted(abs(e) for e in errors)
    if not xs:
        return {"median": math.nan, "p90": math.nan, "max": math.nan, "count": 0}
    return {"median": _quantile(xs, 0.5), "p90": _quantile(xs, 0.9), "max": xs[-1],
            "count": len(xs)}


@dataclass(frozen=True)
class ComparedRow:
    """One aligned depth; ratio = predicted / measured speed, err = ratio - 1 (> 0: too fast)."""
    split: str
    n_kv: int
    measured_pp: float
    predicted_pp: float
    ratio_pp: float
    err_pp: float
    measured_tg: float
    predicted_tg: float
    ratio_tg: float
    err_tg: float


@dataclass(frozen=True)
class Comparison:
    rows: tuple[ComparedRow, ...]
    summary: dict[str, Any]

    def format(self) -> str:
        fmt = "%-8s %7s" + " %10s %10s %7s %8s" * 2 + "\n"
        out = fmt % ("split", "N_KV", "S_PP meas", "S_PP pred", "ratio", "err",
                     "S_TG meas", "S_TG pred", "ratio", "err")
        for r in self.rows:
            out += fmt % (r.split or "-", r.n_kv, f"{r.measured_pp:.2f}", f"{r.predicted_pp:.2f}",
                          f"{r.ratio_pp:.3f}", f"{r.err_pp:+.1%}", f"{r.measured_tg:.2f}",
                          f"{r.predicted_tg:.2f}", f"{r.ratio_tg:.3f}", f"{r.err_tg:+.1%}")
        for m in ("pp", "tg"):
            s = self.summary[m]
            out += (f"{m.upper()}: n={s['count']}  |err| median {s['median']:.1%}  "
                    f"p90 {s['p90']:.1%}  max {s['max']:.1%}  bias {s['bias']:+.1%}\n")
        return out + (f"unmatched rows: {self.summary['unmatched_measured']} measured, "
                      f"{self.summary['unmatched_predicted']} predicted\n")


def _keyed(t: SweepTable, use_split: bool) -> dict[tuple[str, int], SweepRow]:
    if not use_split and len(t.splits()) > 1:  # never guess which split the caller meant
        raise TableError(f"{t.label or 'table'}: has splits {t.splits()}; pick one with by_split()")
    out: dict[tuple[str, int], SweepRow] = {}
    for r in t.rows:
        key = (r.split if use_split else "", r.n_kv)
        if key in out:
            raise TableError(f"{t.label or 'table'}: two rows at split={key[0]!r} n_kv={key[1]}")
        out[key] = r
    return out


def compare(measured: SweepTable, predicted: SweepTable) -> Comparison:
    """Per-depth ratio predicted/measured of S_PP and S_TG, and error statistics.

    Rows align on n_kv, and on split too when both tables name splits; a table with several
    splits facing one without is refused (the caller picks one with `by_split`)."""
    use_split = bool(measured.splits() and predicted.splits())
    m, p = _keyed(measured, use_split), _keyed(predicted, use_split)
    keys = [k for k in m if k in p]  # measured order: deterministic and as the user reads it
    if not keys:
        raise TableError(f"{measured.label or 'measured'} vs {predicted.label or 'predicted'}: "
                         f"no row aligns on n_kv{' and split' if use_split else ''}")
    rows = []
    for k in keys:
        a, b = m[k], p[k]  # a zero measured speed gives an infinite error, not a crash
        rpp, rtg = (b.s_pp_tps / a.s_pp_tps if a.s_pp_tps else math.inf,
                    b.s_tg_tps / a.s_tg_tps if a.s_tg_tps else math.inf)
        rows.append(ComparedRow(a.split or b.split, k[1], a.s_pp_tps, b.s_pp_tps, rpp, rpp - 1,
                                a.s_tg_tps, b.s_tg_tps, rtg, rtg - 1))
    summary: dict[str, Any] = {"unmatched_measured": len(m) - len(keys),
                               "unmatched_predicted": len(p) - len(keys)}
    for metric in ("pp", "tg"):
        errs = [getattr(r, f"err_{metric}") for r in rows]
        # bias = median signed error: a cost model that is uniformly 10% optimistic shows +10%
        summary[metric] = error_stats(errs) | {"bias": _quantile(sorted(errs), 0.5)}
    return Comparison(tuple(rows), summary)


def crossover(a: SweepTable, b: SweepTable, metric: Metric) -> float | None:
    """Smallest depth N_KV at which b's speed reaches a's, or None if it never does.

    Over the depths both tables share, the zero of (speed_b - speed_a) is interpolated linearly
    between the rows bracketing its first sign change; b already >= a at the first depth gives
    that depth."""
    sa = {k[1]: r.speed(metric) for k, r in _keyed(a, False).items()}
    sb = {k[1]: r.speed(metric) for k, r in _keyed(b, False).items()}
    depths = sorted(k for k in sa if k in sb)
    if not depths:
        raise TableError(f"{a.label or 'a'} vs {b.label or 'b'}: no common n_kv")
    n0, d0 = depths[0], -1.0
    for n in depths:
        d = sb[n] - sa[n]
        if d >= 0:  # d0 < 0 <= d: the zero of the segment lies in (n0, n]
            return float(n) if n == depths[0] else n0 + (n - n0) * -d0 / (d - d0)
        n0, d0 = n, d
    return None
