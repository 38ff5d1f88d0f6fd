"""`python -m backends.costmodel.mmq_table TABLE [SYSTEM] [ENGINE]`: every dense MUL_MAT row of a
bench/peer_ops.cpp kernel table with more than `mmv_max_tokens` tokens, as measured and as the
engine profile prices one such matmul on SYSTEM (default 1xH200, ik_llama.cpp)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from backends.costmodel.price import price
from backends.costmodel.profiles import load_engine
from backends.costmodel.timeline import node_costs
from graphir.builder import Builder
from graphir.graph import Graph, verify
from graphir.ops import Op
from graphir.spec import TensorSpec
from hardware.profiles import ProfileError, resolve_system


def one_matmul(wtype: str, n: int, k: int) -> Graph:
    """A prefill graph of one matmul: T tokens x k inputs times an n x k weight of `wtype`."""
    b = Builder()
    x = b.leaf(Op.INPUT, "x", TensorSpec(("T", k), "f32"), device="cuda:0", role="x")
    w = b.leaf(Op.WEIGHT, "w", TensorSpec((n, k), wtype), device="cuda:0")
    y = b.emit(Op.MATMUL, "y", x, w, device="cuda:0")
    b.emit(Op.OUTPUT, "out", y, device="cuda:0", key="out")
    g = b.graph(phase="pp")
    verify(g)
    return g


def main(argv: list[str] | None = None) -> int:
    """Print the rows; 2 with one line on stderr for a bad table, system or engine."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if not 1 <= len(args) <= 3:
            raise ProfileError("usage: python -m backends.costmodel.mmq_table TABLE.csv [SYSTEM] [ENGINE]")
        sysm = resolve_system(args[1] if len(args) > 1 else "1xH200")
        eng = load_engine(args[2] if len(args) > 2 else "ik_llama.cpp")
        with Path(args[0]).open(encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))
                    if r["op"] == "MUL_MAT" and int(r["n"]) > eng.mmv_max_tokens]
    except (OSError, KeyError, ValueError, ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("type     rows  inner tokens  measured_us  priced_us    err  measured_TFLOP/s")
    errs = []
    for r in rows:
        n, m, k = int(r["m"]), int(r["n"]), int(r["k"])  # peer_ops: m rows, n tokens, k inner
        pr = price(one_matmul(r["type"].lower(), n, k), m)
        t = float(node_costs(pr, sysm, eng, np.array([0.0]), breakdown=False)[0][0, 0]) * 1e6
        errs.append(t / float(r["us"]) - 1)
        print(f"{r['type']:7s} {n:6d} {k:6d} {m:6d} {float(r['us']):12.1f} {t:10.1f} {100 * errs[-1]:+6.1f}%"
              f" {float(r['tflops']):9.1f}")
    if errs:
        print(f"|err| median / max: {100 * np.median(np.abs(errs)):.1f} % / {100 * np.max(np.abs(errs)):.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
