"""Time one full prediction in-process: build, place, price and sweep 2 split modes x 48 depths
(PP and TG) of the main job. The design target is under one second."""

from __future__ import annotations

import time

from planner.predict import Workload, predict


def main() -> None:
    args = dict(model="qwen3-next-80b-a3b", hw="2x3090", engine="ik_llama.cpp", quant="IQ4_XS", kv_type="q8_0",
                splits=("layer", "graph"), workload=Workload(2048, 128, 98304))
    predict(**args)  # warm imports and caches once
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        p = predict(**args)
        runs.append(time.perf_counter() - t0)
    rows = sum(len(m.rows) for m in p.modes.values())
    print(f"predict {args['model']} on {args['hw']}: {rows} rows (2 modes x {rows // 2} depths, PP and TG) "
          f"in {min(runs):.3f} s (best of 3; runs {', '.join(f'{r:.3f}' for r in runs)})")
    print(f"PP crossover {p.crossover('pp')}, TG crossover {p.crossover('tg')}")


if __name__ == "__main__":
    main()
