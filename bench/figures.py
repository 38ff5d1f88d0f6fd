"""Generate the pictures the docs show (`make figures`), into docs/img/:

- qwen3next_graph_2x3090_layers.svg: the layer view of Qwen3-Next-80B (IQ4_XS) graph-split
  over two GPUs, all 48 layers (`graphir show`);
- prediction_qwen3next_2x3090.png: the predicted sweep of both split modes on 2x RTX 3090,
  with the measured tables (backends/costmodel/data/measured) as points (`graphir predict --plot --measured`);
- timeline_qwen3next_graph.png: the per-GPU Gantt chart of one predicted PP step and one TG
  step under graph split (`graphir timeline`).

Every file is written atomically and is byte-identical from run to run (Graphviz output is
deterministic; matplotlib's dates and random ids are switched off), so re-running it leaves
git clean unless the model, the placement or the cost model changed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from anywhere

from planner import report  # noqa: E402
from planner.predict import Workload, predict  # noqa: E402
from cli.predict import split_tables  # noqa: E402
from graphir.fileio import write_output  # noqa: E402
from cli.show import gantt, show, timeline  # noqa: E402
from reports.sweep import read_table  # noqa: E402

IMG = ROOT / "docs" / "img"
MEASURED = ROOT / "backends" / "costmodel" / "data" / "measured"  # the published tables (calibration set)
MODEL, QUANT, KV = "qwen3-next-80b-a3b", "IQ4_XS", "q8_0"
MEASURED_TABLES = tuple(MEASURED / f"qwen3next_80b_iq4xs_q8kv_2x3090_{split}.md" for split in ("layer", "graph"))
LIMIT = 1 << 20  # commit-sized: every picture under 1 MB


def placed_graph() -> Path:
    out = IMG / "qwen3next_graph_2x3090_layers.svg"
    write_output(out, show(MODEL, split="graph", devices="cuda:0,cuda:1", quant=QUANT, kv_type=KV, fmt="svg"))
    return out


def prediction() -> Path:
    out = IMG / "prediction_qwen3next_2x3090.png"
    pred = predict(MODEL, "2x3090", "ik_llama.cpp", QUANT, KV, ("layer", "graph"), workload=Workload(2048, 128, 98304))
    measured = {}
    for path in MEASURED_TABLES:
        measured.update(dict(split_tables(path, read_table(path), None)))
    report.plot(pred, out, measured)
    return out


def gantt_chart() -> Path:
    out = IMG / "timeline_qwen3next_graph.png"
    panels, devices, ops, title = timeline(MODEL, hw="2x3090", quant=QUANT, kv_type=KV, split="graph")
    gantt(panels, devices, ops, title, out)
    return out


def main() -> None:
    missing = [p for p in MEASURED_TABLES if not p.is_file()]
    if missing:  # a plot without its measured points must not replace the committed one
        sys.exit(f"figures.py: {missing[0]} is missing: the prediction plot draws the measured tables")
    IMG.mkdir(parents=True, exist_ok=True)
    for make in (placed_graph, prediction, gantt_chart):
        t0 = time.perf_counter()
        path = make()
        size = path.stat().st_size
        print(f"{path.relative_to(ROOT)}: {size / 1024:.0f} KiB in {time.perf_counter() - t0:.1f} s")
        if size > LIMIT:
            sys.exit(f"{path.relative_to(ROOT)} is {size / 1024:.0f} KiB, over the 1 MiB limit for committed images")


if __name__ == "__main__":
    main()
