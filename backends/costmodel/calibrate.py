"""Fit a few physical engine parameters to measured sweep tables (least squares).

Residuals are log(predicted speed / measured speed) for S_PP and S_TG of every measured row of
every case (one case = one placed model + one measured table), so PP and TG rows, fast and slow
modes weigh alike. Parameters are fitted in log space (they are positive rates, efficiencies
and latencies) inside their physical bounds, with a weak prior pull towards the profile's
starting values so that a parameter the data cannot see stays where physics put it instead of
drifting. Levenberg-Marquardt with a forward-difference Jacobian; numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from backends.costmodel.price import Priced
from backends.costmodel.profiles import FITTABLE, Engine, ProfileError, System
from backends.costmodel.timeline import evaluate
from graphir.progress import track
from graphir.sweep import SweepTable, error_stats

PRIOR_WEIGHT = 0.05  # residual weight of log(param / start): a factor e costs as much as 5% error
ROBUST_SCALE = 0.03  # soft-L1 loss: errors beyond ~3% count linearly, so a warm-up row cannot steer


@dataclass(frozen=True)
class Case:
    """One measured table and the priced graphs that should reproduce it."""
    label: str
    pp: Priced
    tg: Priced
    table: SweepTable


@dataclass(frozen=True)
class FitResult:
    engine: Engine
    start: dict[str, float]
    fitted: dict[str, float]
    cost: float
    iterations: int
    per_case: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # label -> pp/tg -> stats

    def report(self) -> str:
        lines = ["parameter           start      fitted"]
        for k in self.fitted:
            lines.append(f"{k:<16} {self.start[k]:>9.4g}  {self.fitted[k]:>10.4g}")
        lines.append(f"iterations {self.iterations}, cost {self.cost:.5f}")
        for label, st in self.per_case.items():
            for m in ("pp", "tg"):
                s = st[m]
                lines.append(f"{label} {m.upper()}: |err| median {s['median']:.1%}  p90 {s['p90']:.1%}  "
                             f"max {s['max']:.1%}  bias {s['bias']:+.1%}  (n={s['count']})")
        return "\n".join(lines) + "\n"


def predict_speeds(case: Case, sysm: System, eng: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Predicted S_PP and S_TG at the measured rows of `case`."""
    rows = case.table.rows
    depth = np.array([r.n_kv for r in rows], dtype=float)
    pp_tok = np.array([r.pp for r in rows], dtype=float)
    tg_tok = np.array([r.tg for r in rows], dtype=float)
    t_pp = evaluate(case.pp, sysm, eng, depth).total
    t_tg = evaluate(case.tg, sysm, eng, depth + (tg_tok - 1) / 2).total  # TG tokens at rising depth
    return pp_tok / t_pp, 1.0 / t_tg


def _residuals(cases: Sequence[Case], sysm: System, eng: Engine) -> np.ndarray:
    out = []
    for c in cases:
        s_pp, s_tg = predict_speeds(c, sysm, eng)
        m_pp = np.array([r.s_pp_tps for r in c.table.rows])
        m_tg = np.array([r.s_tg_tps for r in c.table.rows])
        out += [np.log(s_pp / m_pp), np.log(s_tg / m_tg)]
    r = np.concatenate(out)
    z = (r / ROBUST_SCALE) ** 2  # soft-L1 as a residual transform: r' ** 2 = 2 d^2 (sqrt(1 + z) - 1)
    return np.sign(r) * ROBUST_SCALE * np.sqrt(2.0 * (np.sqrt(1.0 + z) - 1.0))


def _stats(cases: Sequence[Case], sysm: System, eng: Engine) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for c in cases:
        s_pp, s_tg = predict_speeds(c, sysm, eng)
        st = {}
        for m, pred in (("pp", s_pp), ("tg", s_tg)):
            meas = np.array([r.speed(m) for r in c.table.rows])
            err = pred / meas - 1
            st[m] = error_stats(list(err)) | {"bias": float(np.median(err))}
        out[c.label] = st
    return out


def fit(cases: Sequence[Case], sysm: System, eng: Engine, params: Sequence[str] | None = None,
        max_iter: int = 40) -> FitResult:
    """Fit `params` (default: the engine's `fit` list) of `eng` to the measured `cases`."""
    names = list(params if params is not None else eng.fit)
    bad = [p for p in names if p not in FITTABLE]
    if bad or not names:
        raise ProfileError(f"cannot fit {', '.join(bad) or 'nothing'}; fittable: {', '.join(FITTABLE)}")
    if not cases:
        raise ProfileError("calibrate needs at least one measured table")
    start = {p: float(getattr(eng, p)) for p in names}
    x0 = np.log([max(start[p], 1e-9) for p in names])
    lo = np.array([math.log(eng.bounds.get(p, (start[p] / 10, start[p] * 10))[0] or 1e-9) for p in names])
    hi = np.array([math.log(eng.bounds.get(p, (start[p] / 10, start[p] * 10))[1]) for p in names])
    upper_one = {"mem_eff", "gemm_eff", "attn_pp_eff", "attn_tg_eff", "recurrent_eff", "comm_bw_eff"}
    hi = np.array([min(h, 0.0) if p in upper_one else h for p, h in zip(names, hi)])
    x0 = np.clip(x0, lo, hi)
    # the prior centre is the profile's stated physical expectation, so refitting a fitted
    # profile reproduces it instead of drifting towards its own last result
    xp = np.clip(np.log([eng.priors.get(p, start[p]) or 1e-9 for p in names]), lo, hi)

    def engine_at(x: np.ndarray) -> Engine:
        return eng.with_params(**{p: float(math.exp(v)) for p, v in zip(names, x)})

    def resid(x: np.ndarray) -> np.ndarray:
        return np.concatenate([_residuals(cases, sysm, engine_at(x)), PRIOR_WEIGHT * (x - xp)])

    x, r = x0.copy(), resid(x0)
    cost, lam, it = float(r @ r), 1e-2, 0
    for it in track(range(1, max_iter + 1), "calibrate"):  # a break closes the bar
        J = np.empty((len(r), len(x)))
        for j in range(len(x)):
            h = 1e-4
            xj = x.copy()
            xj[j] = xj[j] + h if xj[j] + h <= hi[j] else xj[j] - h
            J[:, j] = (resid(xj) - r) / (xj[j] - x[j])
        A, g = J.T @ J, J.T @ r
        improved = False
        for _ in range(12):
            step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
            xn = np.clip(x + step, lo, hi)
            rn = resid(xn)
            cn = float(rn @ rn)
            if cn < cost:
                improved = True
                rel = (cost - cn) / max(cost, 1e-30)
                x, r, cost, lam = xn, rn, cn, max(lam / 3, 1e-7)
                break
            lam *= 4
        if not improved or rel < 1e-7:
            break
    fitted = {p: float(f"{math.exp(v):.4g}") for p, v in zip(names, x)}  # 4 digits: what data supports
    out = eng.with_params(**fitted)
    return FitResult(out, start, fitted, cost, it, _stats(cases, sysm, out))
