"""`python -m backends.costmodel.mmid_table TABLE [SYSTEM]`: ik's MoE expert matmul model
(mmid.py) against a bench/peer_ops.cpp kernel table: the fit of its two values and every row as
measured, as modelled and as the dense-GEMM term prices it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from backends.costmodel.mmid import dense_seconds, fit_rows, kernel_rows, kernel_seconds
from backends.costmodel.profiles import load_engine
from hardware.profiles import ProfileError, resolve_system


def main(argv: list[str] | None = None) -> int:
    """Print the fit and the rows; 2 with one line on stderr for a bad table or system."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if not 1 <= len(args) <= 2:
            raise ProfileError("usage: python -m backends.costmodel.mmid_table TABLE.csv [SYSTEM, default 1xH200]")
        gpu = resolve_system(args[1] if len(args) > 1 else "1xH200").gpu
        rows = kernel_rows(Path(args[0]))
        if not rows:
            raise ProfileError(f"{args[0]}: no quantised MUL_MAT_ID rows")
    except (OSError, KeyError, ValueError, ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eng = load_engine("ik_llama.cpp").for_gpu(gpu)
    gpu = eng.run_gpu(gpu)  # the clock the kernels held while they were timed
    route, slot, eff = fit_rows(rows, gpu, eng)
    print(f"fit to {len(rows)} rows: mmid_route_us {route:.4g}  mmid_slot_us {slot:.4g}  mmid_eff {eff:.4g}  "
          f"(profile: {eng.mmid_route_us:.4g}, {eng.mmid_slot_us:.4g}, {eng.mmid_eff:.4g})")
    print("type     rows inner tokens  E  k   measured_us  model_us    err   dense_us    err")
    new, old = [], []
    for r in rows:
        e = r.case
        a, b = kernel_seconds(e, gpu, eng) * 1e6, dense_seconds(e, gpu, eng) * 1e6
        new.append(abs(a / r.us - 1))
        old.append(abs(b / r.us - 1))
        print(f"{e.wtype:7s} {e.rows:5d} {e.inner:5d} {e.tokens:6d} {e.experts:3d} {e.used:2d} {r.us:12.1f}"
              f" {a:9.1f} {100 * (a / r.us - 1):+6.1f}% {b:9.1f} {100 * (b / r.us - 1):+6.1f}%")
    print(f"|err| median / max: model {100 * np.median(new):.1f} % / {100 * max(new):.1f} %, "
          f"dense term {100 * np.median(old):.1f} % / {100 * max(old):.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
