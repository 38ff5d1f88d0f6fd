"""`python -m planner.gap_table MANIFEST [ENGINE]` (ENGINE: the manifest's own by default): per measured row of every case, the
time of one prefill u-batch and of one decode token as measured and as predicted, and what the
prediction misses (ms), with the predicted prefill split by op at the first and last depth. The
check behind `graphir calibrate --manifest M --no-fit` in milliseconds: a miss that stays flat
with depth is time outside the priced kernels, one that grows is per cached token."""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np

from backends.costmodel.profiles import load_engine
from backends.costmodel.timeline import mask_seconds, node_costs
from hardware.profiles import ProfileError


def main(argv: list[str] | None = None) -> int:
    """Print the table; 2 with one line on stderr for a bad manifest or engine."""
    from backends.costmodel.calibrate import _case_engine, predict_speeds
    from planner.dataset import build_cases, load_manifest  # the planner builds cases; this tool sits above it

    args = sys.argv[1:] if argv is None else argv
    try:
        if not 1 <= len(args) <= 2:
            raise ProfileError("usage: python -m planner.gap_table MANIFEST.yaml [ENGINE]")
        eng = load_engine(args[1] if len(args) > 1 else load_manifest(args[0])[0].engine)
        cases = build_cases(eng, args[0])
    except (OSError, ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c in cases:
        kv = np.array([float(r.n_kv) for r in c.table.rows])
        s_pp, s_tg = predict_speeds(c, None, eng)
        rows = c.table.rows
        for phase, pred, meas in (("pp", [r.pp for r in rows] / s_pp, [r.t_pp_s for r in rows]),
                                  ("tg", 1.0 / s_tg, [r.t_tg_s / r.tg for r in rows])):
            pred, meas = np.asarray(pred) * 1e3, np.asarray(meas) * 1e3
            print(f"{c.label} {phase.upper()} ms per {'u-batch' if phase == 'pp' else 'token'}")
            print("  n_kv      " + " ".join(f"{int(k):>7d}" for k in kv))
            for name, v in (("measured", meas), ("predicted", pred), ("missing", meas - pred)):
                print(f"  {name:<9} " + " ".join(f"{x:7.2f}" for x in v))
        run = _case_engine(c, eng).for_gpu(c.system.gpu)  # type: ignore[union-attr]
        cost, _ = node_costs(c.pp, c.system, run, kv[[0, -1]], breakdown=False)  # type: ignore[arg-type]
        by_op: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(2))
        for i, op in enumerate(c.pp.ops):
            by_op[op] += cost[i]
        by_op["host KQ mask"] = mask_seconds(c.pp, run, kv[[0, -1]])
        parts = sorted(by_op.items(), key=lambda kv_: -kv_[1][1])[:8]
        print("  prefill by op (ms at first / last depth): "
              + ", ".join(f"{op} {a * 1e3:.1f}/{b * 1e3:.1f}" for op, (a, b) in parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
