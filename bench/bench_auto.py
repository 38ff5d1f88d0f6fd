"""Time `place_auto`'s search (build both phases, place and price every candidate, choose a plan).

    python bench/bench_auto.py [--repeat 3]

Cases: the two models of docs/results/auto_2x3090.md on 2x3090 with ik_llama.cpp, and both
bf16 on 2xH200 with graphir-cuda. Prints wall and CPU seconds (best of the repeats; CPU time
too because on a busy machine wall time measures the neighbours), placements priced, and the
plan's gain over the better of layer and graph split.
"""

from __future__ import annotations

import argparse
import time

from graphir.models import BuildOptions, build
from graphir.models.sources import load_source
from graphir.quant import scheme
from planner import Workload, place_auto

CASES = (  # model, quant, KV type, system, engine
    ("qwen3-next-80b-a3b", "IQ4_XS", "q8_0", "2x3090", "ik_llama.cpp"),
    ("qwen3-14b", "Q4_0", "f16", "2x3090", "ik_llama.cpp"),
    ("qwen3-next-80b-a3b", "bf16", "bf16", "2xH200", "graphir-cuda"),
    ("qwen3-14b", "bf16", "bf16", "2xH200", "graphir-cuda"),
)


def once(model: str, quant: str, kv: str, hw: str, engine: str) -> tuple[float, float, object]:
    c0, t0 = time.process_time(), time.perf_counter()
    cfg = load_source(model).cfg
    gs = {ph: build(cfg, BuildOptions(phase=ph, quant=scheme(quant), kv_type=kv, logits="last"))  # type: ignore[arg-type]
          for ph in ("pp", "tg")}
    plan = place_auto(gs["pp"], cfg, ("cuda:0", "cuda:1"), Workload(), hw, engine, graphs=gs).plan
    return time.perf_counter() - t0, time.process_time() - c0, plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    place_auto  # noqa: B018  (imports warm before the first timed run)
    for case in CASES:
        runs = [once(*case) for _ in range(a.repeat)]
        wall, cpu, plan = min(runs, key=lambda r: r[1])
        g = plan.gain()  # type: ignore[attr-defined]
        print(f"{case[0]} {case[1]} on {case[3]} ({case[4]}): {plan.evaluated} placements priced, "  # type: ignore[attr-defined]
              f"search {plan.seconds:.2f} s, with building {wall:.2f} s wall / {cpu:.2f} s CPU (best of {a.repeat}); "  # type: ignore[attr-defined]
              f"gain PP x{g['pp'].min():.3f}..x{g['pp'].max():.3f}, TG x{g['tg'].min():.3f}..x{g['tg'].max():.3f}, "
              f"{len(plan.segments)} depth range(s)")  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
