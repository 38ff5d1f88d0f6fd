"""Sustained tensor-core load on one GPU: matmul rate and SM clock per second for a while.

Why: kernel benchmarks (bench/peer_ops.cpp, one kernel a few hundred times) run at the boost
clock; a sweep keeps the tensor cores busy for minutes, and a GPU held to its power limit
clocks down. The ratio of the sustained to the burst rate is the GPU's `clock_eff` in
hardware/data/gpus.yaml. Prints one line per second and the ratio; needs CUDA
(prints a skip line without it). `python bench/bench_clocks.py [seconds]`
"""

from __future__ import annotations

# bench: needs a CUDA GPU  (`make bench` skips this script on a machine without one)

import subprocess
import sys
import time


def _clock() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=5).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(seconds: float = 30.0) -> int:
    try:
        import torch
    except ImportError:
        print("bench_clocks.py: skipped: needs a CUDA GPU")
        return 0
    if not torch.cuda.is_available():
        print("bench_clocks.py: skipped: needs a CUDA GPU")
        return 0
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    qa = torch.randint(-64, 64, (n, n), device="cuda", dtype=torch.int8)
    qb = torch.randint(-64, 64, (n, n), device="cuda", dtype=torch.int8)
    rates: dict[str, list[float]] = {"bf16": [], "int8": []}
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for kind in ("bf16", "int8"):
            torch.cuda.synchronize()
            t0, reps = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.5:
                for _ in range(10):
                    _ = a @ b if kind == "bf16" else torch._int_mm(qa, qb)
                torch.cuda.synchronize()
                reps += 10
            rate = 2.0 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
            rates[kind].append(rate)
            print(f"{kind:5s} {rate:7.1f} TFLOP/s  clock,max,power,temp: {_clock()}", flush=True)
    for kind, r in rates.items():
        first, last = r[0], sum(r[-4:]) / len(r[-4:])
        print(f"{kind}: first half-second {first:.1f}, last two seconds {last:.1f} TFLOP/s, sustained/burst {last / first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0))
