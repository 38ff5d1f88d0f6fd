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

from backends.costmodel.options import EngineOptions, apply
from backends.costmodel.price import Priced
from backends.costmodel.profiles import FITTABLE, RATIOS, Engine, known_param
from hardware.profiles import ProfileError, System
from backends.costmodel.timeline import evaluate
from reports.progress import track
from reports.sweep import SweepTable
from reports.sweep_compare import error_stats

PRIOR_WEIGHT = 0.05  # residual weight of log(param / start): a factor e costs as much as 5% error
ROBUST_SCALE = 0.03  # soft-L1 loss: errors beyond ~3% count linearly, so a warm-up row cannot steer


@dataclass(frozen=True)
class Ratio:
    """A published speed ratio of another split mode over the case's own at one depth
    (`graph is +77 % PP at 40k`): `other` holds the other mode's priced (pp, tg) graphs."""
    n_kv: int
    pp: float | None
    tg: float | None


@dataclass(frozen=True)
class Case:
    """One measured table, the rig it ran on and the priced graphs that should reproduce it."""
    label: str
    pp: Priced
    tg: Priced
    table: SweepTable
    system: System | None = None  # None: the system fit() is given
    options: EngineOptions | None = None  # the engine flags the table ran with (None: the profile's own)
    split: str = ""  # the split mode they apply to (ik turns some off under graph split)
    ratios: tuple[Ratio, ...] = ()
    other: tuple[Priced, Priced] | None = None  # the mode the ratios compare with


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
                             f"max {s['max']:.1%}  bias {s['bias']:+.1%}  (n={s['count']:.0f})")
            for k, v in st.items():
                if k.startswith("ratio "):
                    lines.append(f"{label} graph/layer {k.removeprefix('ratio ')}: predicted {v['predicted']:.2f}, "
                                 f"published {v['published']:.2f} ({v['error']:+.1%})")
        return "\n".join(lines) + "\n"


def _case_engine(case: Case, eng: Engine) -> Engine:
    """The profile being fitted, with the case's own flags applied (options.apply)."""
    if case.options is None or case.system is None:
        return eng
    return apply(case.options, eng, case.system, case.split)[0]


def _speeds(pp: Priced, tg: Priced, sysm: System, eng: Engine, depth: np.ndarray, pp_tok: np.ndarray,
            tg_tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t_pp = evaluate(pp, sysm, eng, depth, breakdown=False).total
    t_tg = evaluate(tg, sysm, eng, depth + (tg_tok - 1) / 2, breakdown=False).total  # TG at rising depth
    return pp_tok / t_pp, 1.0 / t_tg


def predict_speeds(case: Case, sysm: System | None, eng: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Predicted S_PP and S_TG at the measured rows of `case`."""
    rows = case.table.rows
    depth = np.array([r.n_kv for r in rows], dtype=float)
    pp_tok = np.array([r.pp for r in rows], dtype=float)
    tg_tok = np.array([r.tg for r in rows], dtype=float)
    return _speeds(case.pp, case.tg, case.system or sysm, _case_engine(case, eng), depth, pp_tok, tg_tok)  # type: ignore[arg-type]


def predict_ratios(case: Case, sysm: System | None, eng: Engine) -> list[tuple[str, float, float]]:
    """(label, predicted, published) for each of the case's published ratios."""
    if not case.ratios or case.other is None:
        return []
    ub, tg = float(case.table.rows[0].pp), float(case.table.rows[0].tg)
    out = []
    for r in case.ratios:
        d, p, t = np.array([float(r.n_kv)]), np.array([ub]), np.array([tg])
        s, e = case.system or sysm, _case_engine(case, eng)
        own = _speeds(case.pp, case.tg, s, e, d, p, t)  # type: ignore[arg-type]
        alt = _speeds(case.other[0], case.other[1], s, e, d, p, t)  # type: ignore[arg-type]
        for i, (m, want) in enumerate((("pp", r.pp), ("tg", r.tg))):
            if want is not None:
                out.append((f"{m}@{r.n_kv}", float(alt[i][0] / own[i][0]), float(want)))
    return out


RATIO_WEIGHT = 3.0  # a published ratio is one number standing for a whole table's worth of rows


def _residuals(cases: Sequence[Case], sysm: System | None, eng: Engine) -> np.ndarray:
    out = []
    for c in cases:
        s_pp, s_tg = predict_speeds(c, sysm, eng)
        m_pp = np.array([r.s_pp_tps for r in c.table.rows])
        m_tg = np.array([r.s_tg_tps for r in c.table.rows])
        # every table weighs alike whatever its row count: a 66-row sweep must not drown a 6-row one
        w = 1.0 / np.sqrt(len(m_pp))
        out += [w * np.log(s_pp / m_pp), w * np.log(s_tg / m_tg)]
        rat = predict_ratios(c, sysm, eng)
        if rat:
            out.append(RATIO_WEIGHT * w * np.log(np.array([p / m for _, p, m in rat])))
    r = np.concatenate(out)
    z = (r / ROBUST_SCALE) ** 2  # soft-L1 as a residual transform: r' ** 2 = 2 d^2 (sqrt(1 + z) - 1)
    return np.sign(r) * ROBUST_SCALE * np.sqrt(2.0 * (np.sqrt(1.0 + z) - 1.0))


def _stats(cases: Sequence[Case], sysm: System | None, eng: Engine) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for c in cases:
        s_pp, s_tg = predict_speeds(c, sysm, eng)
        st = {}
        for m, pred in (("pp", s_pp), ("tg", s_tg)):
            meas = np.array([r.speed(m) for r in c.table.rows])
            err = pred / meas - 1
            st[m] = error_stats(list(err)) | {"bias": float(np.median(err))}
        for label, p, want in predict_ratios(c, sysm, eng):
            st[f"ratio {label}"] = {"predicted": p, "published": want, "error": p / want - 1}
        out[c.label] = st
    return out


def fit(cases: Sequence[Case], sysm: System | None, eng: Engine, params: Sequence[str] | None = None,
        max_iter: int = 40) -> FitResult:
    """Fit `params` (default: the engine's `fit` list) of `eng` to the measured `cases` jointly
    (each case on its own system, or on `sysm` when it names none)."""
    names = list(params if params is not None else eng.fit)
    bad = [p for p in names if not known_param(p)]
    if bad or not names:
        raise ProfileError(f"cannot fit {', '.join(bad) or 'nothing'}; fittable: {', '.join(FITTABLE)}")
    if not cases:
        raise ProfileError("calibrate needs at least one measured table")
    start = {p: eng.param(p) for p in names}
    x0 = np.log([max(start[p], 1e-9) for p in names])
    lo = np.array([math.log(eng.bounds.get(p, (start[p] / 10, start[p] * 10))[0] or 1e-9) for p in names])
    hi = np.array([math.log(eng.bounds.get(p, (start[p] / 10, start[p] * 10))[1]) for p in names])
    hi = np.array([min(h, 0.0) if p.rpartition(".")[2] in RATIOS or p.startswith("quant_") else h
                   for p, h in zip(names, hi)])
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


def cross_validate(cases: Sequence[Case], sysm: System | None, eng: Engine, params: Sequence[str] | None = None,
                   max_iter: int = 40) -> dict[str, dict[str, dict[str, float]]]:
    """Leave-one-out: for each case, fit on all the others and predict it. Returns the held-out
    error statistics per case (the accuracy to report: no table judges a fit it was part of)."""
    if len(cases) < 2:
        raise ProfileError("cross-validation needs at least two measured tables")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for i, held in enumerate(track(cases, "leave one out")):
        rest = [c for j, c in enumerate(cases) if j != i]
        res = fit(rest, sysm, eng, params, max_iter)
        out[held.label] = _stats([held], sysm, res.engine)[held.label]
    return out
