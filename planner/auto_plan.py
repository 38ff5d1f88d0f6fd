"""From priced candidates to a plan: which placement runs PP and which TG, per depth range.

What an engine can honestly do (docs/results/auto_2x3090.md explains the choice):

- Weights never move at run time: every weight piece any placement of the plan uses stays
  resident, so PP and TG placements may differ in weights only if the union fits.
- PP and TG share the KV cache and the recurrent state. Placements that agree on where each
  state piece lives share it for free. If they disagree, both layouts are kept: after each
  PP the rows it appended (u-batch) and the mutable state (delta-net, conv) are copied into
  the TG layout, after each TG its rows and state back; that time is charged to every row's TG.
- Depth ranges (`max_segments`) may switch to other placements. The KV cache is append-only,
  so rows written before the last u-batch are copied to the new layout in the background on
  the otherwise idle link (memory counted); the last u-batch's rows and the mutable state
  are copied at the switch, charged to the first TG of the new range.
- Memory: every weight and state piece any placement of the plan uses, KV at the workload's
  context, plus the largest compute buffer, must fit each device (`passes.check_fit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from planner.auto_space import Piece

CONV_TAGS = (".q", ".k", ".v")  # conv state pieces are `<state>.q#j` ... (passes.tp)


@dataclass(frozen=True)
class StatePiece:
    piece: Piece
    fixed: int  # bytes independent of depth (recurrent and conv state)
    per_row: int  # bytes per cached token (KV cache)


def _base(src: str) -> str:
    return src[:-2] if src.endswith(CONV_TAGS) else src


def _overlap(new: StatePiece, here: Sequence[StatePiece]) -> float:
    """Fraction of `new` already in place: `here` are the old layout's pieces of the same
    state on the same device."""
    src, _, dim, lo, hi = new.piece
    if any(o.piece[2] < 0 for o in here):
        return 1.0  # the old layout holds the whole state on this device
    got = 0.0
    for o in here:
        osrc, _, odim, olo, ohi = o.piece
        if dim < 0:
            got += (o.fixed + o.per_row) / max(1, new.fixed + new.per_row)
        elif osrc == src and odim == dim:
            got += max(0, min(hi, ohi) - max(lo, olo)) / (hi - lo)
    return min(1.0, got)


def migration_bytes(old: Sequence[StatePiece], new: Sequence[StatePiece], rows: int) -> list[int]:
    """Bytes to copy into layout `new`, one entry per piece not (all) in place there: mutable
    state in full, KV only for `rows` cached tokens (the rest moved beforehand)."""
    index: dict[tuple[str, str], list[StatePiece]] = {}
    for o in old:
        index.setdefault((_base(o.piece[0]), o.piece[1]), []).append(o)
    out = []
    for p in new:
        miss = 1.0 - _overlap(p, index.get((_base(p.piece[0]), p.piece[1]), []))
        if miss > 1e-9:
            out.append(int(round(miss * (p.fixed + p.per_row * rows))))
    return out


@dataclass(frozen=True)
class Scored:
    """One plan: (first row, pp candidate, tg candidate) per segment, with its numbers."""

    segments: tuple[tuple[int, int, int], ...]  # (first row index, pp cand, tg cand)
    cost: float  # workload seconds (weighted), copies included
    worst: float  # lowest speed ratio to the better standard mode over rows and metrics
    t_pp: np.ndarray  # [D] seconds per u-batch
    t_tg: np.ndarray  # [D] seconds per TG run (state copies included)
    complexity: int  # 0 one placement, 1 PP/TG weights differ, 2 state too, 3+ depth switches


@dataclass(frozen=True)
class Problem:
    """Priced candidates ([C, D] seconds per u-batch and per TG run) and the rules to pair them.

    `layout[c]`: id of candidate c's state layout. `dual(a, b)`: seconds per row to keep a PP
    layout a and a TG layout b both current (0 when a == b); `switch(a, b)`: seconds to bring
    layout b up to date at a depth switch from PP layout a; both are charged to TG. `fits`:
    the memory check of a set of candidates; `ref_*`: speeds of the better standard mode."""

    t_pp: np.ndarray
    t_tg: np.ndarray
    layout: Sequence[int]
    w_pp: np.ndarray
    w_tg: np.ndarray
    ref_pp: np.ndarray
    ref_tg: np.ndarray
    dual: Callable[[int, int], float]
    switch: Callable[[int, int], float]
    fits: Callable[[tuple[int, ...]], bool]
    same_weights: Callable[[int, int], bool]


class _Pairs:
    """(PP candidate, TG candidate) pairs that fit, as arrays over rows."""

    def __init__(self, pr: Problem) -> None:
        # every pair that fits: a candidate slower than others may be the one whose weights or
        # state fit beside the other phase's (no pruning by speed alone)
        C = pr.t_pp.shape[0]
        self.pairs = [(p, t) for p in range(C) for t in range(C) if pr.fits(tuple(sorted({p, t})))]
        P, lay = len(self.pairs), pr.layout
        self.tpp = np.stack([pr.t_pp[p] for p, _ in self.pairs]) if P else np.zeros((0, pr.t_pp.shape[1]))
        self.ttg = np.stack([pr.t_tg[t] + pr.dual(lay[p], lay[t]) for p, t in self.pairs]) if P else self.tpp
        self.cost = pr.w_pp * self.tpp + pr.w_tg * self.ttg
        self.ratio = np.minimum((1 / self.tpp) / pr.ref_pp, (1 / self.ttg) / pr.ref_tg)
        self.mig = np.zeros((P, P))
        self.fit2 = np.ones((P, P), dtype=bool)
        for a, (pa, ta) in enumerate(self.pairs):
            for b, (pb, tb) in enumerate(self.pairs):
                if a != b:
                    self.mig[a, b] = sum(pr.switch(lay[pa], lb) for lb in dict.fromkeys((lay[pb], lay[tb])))
                    self.fit2[a, b] = pr.fits(tuple(sorted({pa, ta, pb, tb})))
        # the first row under b after a switch from a pays the copies in its TG
        self.sw_ttg = self.ttg[None, :, :] + self.mig[:, :, None]
        self.sw_ratio = np.minimum(((1 / self.tpp) / pr.ref_pp)[None], (1 / self.sw_ttg) / pr.ref_tg)
        self.sw_cost = self.cost[None] + pr.w_tg[None, None, :] * self.mig[:, :, None]

    def dp(self, g: float, k_max: int) -> tuple[float, list[int]] | None:
        """Cheapest sequence of pairs over rows, at most `k_max` segments, every row's ratio >= g."""
        P, D = self.cost.shape
        if P == 0:
            return None
        inf = np.inf
        ok = self.ratio >= g - 1e-12
        sw_ok = (self.sw_ratio >= g - 1e-12) & self.fit2[:, :, None] & ~np.eye(P, dtype=bool)[:, :, None]
        dp = np.full((k_max, P), inf)
        dp[0] = np.where(ok[:, 0], self.cost[:, 0], inf)
        parent = np.full((D, k_max, P), -1, dtype=int)  # previous pair (same k: stay)
        for r in range(1, D):
            new = np.where(ok[None, :, r], dp + self.cost[None, :, r], inf)
            parent[r] = np.arange(P)[None, :]
            for k in range(k_max - 1):
                cand = np.where(sw_ok[:, :, r], dp[k][:, None] + self.sw_cost[:, :, r], inf)  # [a, b]
                a = np.argmin(cand, axis=0)
                val = cand[a, np.arange(P)]
                better = val < new[k + 1]
                new[k + 1] = np.where(better, val, new[k + 1])
                parent[r, k + 1] = np.where(better, a, parent[r, k + 1])
            dp = new
        k, b = np.unravel_index(int(np.argmin(dp)), dp.shape)
        if not np.isfinite(dp[k, b]):
            return None
        seq = [int(b)]
        for r in range(D - 1, 0, -1):
            a = int(parent[r, k, seq[-1]])
            if a != seq[-1]:
                k -= 1
            seq.append(a)
        return float(dp.min()), seq[::-1]

    def scored(self, seq: Sequence[int], pr: Problem) -> Scored:
        D = len(seq)
        tpp = np.array([self.tpp[seq[r], r] for r in range(D)])
        ttg = np.array([self.ttg[seq[r], r] + (self.mig[seq[r - 1], seq[r]] if r else 0.0) for r in range(D)])
        segs = tuple((r, *self.pairs[seq[r]]) for r in range(D) if r == 0 or seq[r] != seq[r - 1])
        worst = float(np.minimum((1 / tpp) / pr.ref_pp, (1 / ttg) / pr.ref_tg).min())
        p, t = segs[0][1], segs[0][2]
        cx = 2 + len(segs) if len(segs) > 1 else (0 if pr.same_weights(p, t) else
                                                     (1 if pr.layout[p] == pr.layout[t] else 2))
        return Scored(segs, float((pr.w_pp * tpp + pr.w_tg * ttg).sum()), worst, tpp, ttg, cx)


def choose(pr: Problem, guard: float, tolerance: float, max_segments: int = 3) -> Scored | None:
    """The cheapest plan whose every row is at least `guard` of the better standard mode; if
    none is, the plan with the best such worst row. Then the simplest plan (fewest segments;
    one placement, shared weights, shared state) within `tolerance` of that cost."""
    pz = _Pairs(pr)
    top = pz.dp(-np.inf, max_segments)
    if top is None:
        return None
    g = guard
    if pz.dp(guard, max_segments) is None:  # bisect for the best reachable worst row
        lo, hi = float(pz.scored(top[1], pr).worst), guard
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if pz.dp(mid, max_segments) is not None else (lo, mid)
        g = lo
    best = pz.dp(g, max_segments)
    assert best is not None
    limit = best[0] * (1 + tolerance)
    for k in range(1, max_segments + 1):
        if k == 1:
            ok = [q for q in range(len(pz.pairs)) if np.all(pz.ratio[q] >= g - 1e-12)
                  and pz.cost[q].sum() <= limit]
            if ok:
                plans = [pz.scored([q] * pz.cost.shape[1], pr) for q in ok]
                return min(plans, key=lambda s: (s.complexity, s.cost, s.segments))
            continue
        got = pz.dp(g, k)
        if got is not None and got[0] <= limit:
            return pz.scored(got[1], pr)
    return pz.scored(best[1], pr)
