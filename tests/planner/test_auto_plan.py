"""Plans from priced candidates: state layouts, copies at switches, the guard and simplicity."""

from __future__ import annotations

import numpy as np

from planner.auto_plan import Problem, StatePiece, choose, migration_bytes

KV_ROW = 1000  # bytes per cached token of a whole KV cache in these examples


def _kv(dev: str, lo: int = -1, hi: int = -1) -> StatePiece:
    whole = lo < 0
    return StatePiece(("blk.3.cache_k", dev, -1 if whole else 1, lo, hi), 0, KV_ROW if whole else KV_ROW // 2)


def test_migration_moves_only_what_changes_device() -> None:
    whole0 = [_kv("cuda:0")]
    split = [_kv("cuda:0", 0, 1), _kv("cuda:1", 1, 2)]
    # whole on cuda:0 -> split: cuda:1's head moves, cuda:0's stays; only the last u-batch's rows
    assert migration_bytes(whole0, split, rows=2048) == [KV_ROW // 2 * 2048]
    # split -> whole on cuda:0: cuda:0 already has its half; the other half arrives
    assert migration_bytes(split, whole0, rows=10) == [KV_ROW * 10 // 2]
    assert migration_bytes(split, split, rows=10) == []


def test_conv_state_pieces_match_their_whole_state() -> None:
    whole = [StatePiece(("blk.0.conv_state", "cuda:1", -1, -1, -1), 600, 0)]
    split = [StatePiece((f"blk.0.conv_state.{t}", d, 1, lo, hi), 100, 0)
             for d, lo, hi in (("cuda:0", 0, 8), ("cuda:1", 8, 16)) for t in "qkv"]
    moved = migration_bytes(whole, split, rows=0)
    assert moved == [100, 100, 100]  # cuda:0's three pieces; cuda:1's are inside its whole state
    assert sum(migration_bytes(split, whole, rows=0)) == 300


def _choose(t_pp, t_tg, layout, dual=0.0, switch=0.0, fits=lambda c: True, same=lambda p, t: p == t,  # type: ignore[no-untyped-def]
            segs=3, guard=0.99):
    """References: the better of candidates 0 and 1 per row."""
    t_pp, t_tg = np.asarray(t_pp, float), np.asarray(t_tg, float)
    D = t_pp.shape[1]
    pr = Problem(t_pp, t_tg, layout, np.ones(D), np.ones(D), 1 / t_pp[:2].min(axis=0), 1 / t_tg[:2].min(axis=0),
                 lambda a, b: 0.0 if a == b else dual, lambda a, b: 0.0 if a == b else switch, fits, same)
    return choose(pr, guard, 0.005, segs)


def test_one_placement_when_it_is_best_everywhere() -> None:
    best = _choose([[2, 2, 2], [1, 1, 1]], [[2, 2, 2], [1, 1, 1]], [0, 1])
    assert best.segments == ((0, 1, 1),) and best.worst == 1.0 and best.complexity == 0


def test_pp_and_tg_may_differ_when_they_share_the_state() -> None:
    # candidate 0 wins PP, candidate 1 TG; same state layout, different weights
    best = _choose([[1, 1], [2, 2]], [[2, 2], [1, 1]], [0, 0], same=lambda p, t: False)
    assert best.segments == ((0, 0, 1),) and best.complexity == 1 and best.worst == 1.0


def test_different_state_layouts_pay_copies_every_row() -> None:
    best = _choose([[1, 1], [2, 2]], [[2, 2], [1, 1]], [0, 1], dual=0.5)
    assert best.segments == ((0, 0, 1),)
    assert np.allclose(best.t_tg, [1.5, 1.5]) and best.complexity == 2 and best.worst < 0.99


def test_memory_forbids_keeping_both() -> None:
    best = _choose([[1, 1], [2, 2]], [[2, 2], [1, 1]], [0, 0], fits=lambda c: len(c) == 1)
    assert len({c for _, p, t in best.segments for c in (p, t)}) == 1


def test_depth_switch_pays_at_its_first_row() -> None:
    # 0 is better at shallow rows, 1 at deep rows, for both phases; they disagree on state
    t = [[1, 1, 3, 3], [3, 3, 1, 1]]
    best = _choose(t, t, [0, 1], dual=10.0, switch=0.001)
    assert best.segments == ((0, 0, 0), (2, 1, 1)) and best.complexity == 4
    assert np.isclose(best.t_tg[2], 1.001) and np.isclose(best.worst, 1 / 1.001)


def test_three_ranges_when_pp_and_tg_cross_over_at_different_depths() -> None:
    # PP: 1 wins from row 1; TG: 1 wins from row 3. Between, PP runs 1 and TG runs 0.
    t_pp = [[1, 2, 2, 2, 2], [2, 1, 1, 1, 1]]
    t_tg = [[1, 1, 1, 2, 2], [2, 2, 2, 1, 1]]
    best = _choose(t_pp, t_tg, [0, 0], same=lambda p, t: False)
    assert best.segments == ((0, 0, 0), (1, 1, 0), (3, 1, 1)) and best.worst == 1.0
    two = _choose(t_pp, t_tg, [0, 0], same=lambda p, t: False, segs=2)
    assert len(two.segments) <= 2 and two.worst < 1.0


def test_simplest_plan_within_tolerance() -> None:
    # a switch would gain 0.1%: not worth a second placement
    t = [[1.0, 1.0, 1.0, 1.0], [1.002, 1.002, 1.002, 0.999]]
    assert _choose(t, t, [0, 1]).segments == ((0, 0, 0),)


def test_guard_prefers_no_bad_row_over_lower_cost() -> None:
    # candidate 2 is cheapest in total but 20% slower than the references at the last row
    t_pp = [[1, 1, 1], [1, 1, 1], [0.5, 0.5, 1.25]]
    t_tg = [[1, 1, 1]] * 3
    assert _choose(t_pp, t_tg, [0, 0, 0], segs=1).segments == ((0, 0, 0),)
    assert _choose(t_pp, t_tg, [0, 0, 0], segs=1, guard=0.0).segments == ((0, 2, 2),)
    # with a switch allowed, the cheap rows and the guard go together
    both = _choose(t_pp, t_tg, [0, 0, 0])
    assert both.segments[0][1] == 2 and len(both.segments) == 2 and both.worst == 1.0


def test_best_worst_row_when_the_guard_cannot_hold() -> None:
    # the references' rows cannot both be matched: the plan maximises its worst row
    best = _choose([[1, 1], [2, 2]], [[2, 2], [1, 1]], [0, 1], dual=0.25)
    assert best.segments == ((0, 0, 1),) and np.isclose(best.worst, 1 / 1.25)
