"""The shipped ik_llama.cpp profile against the measured Qwen3-Next tables (2x RTX 3090).

One engine profile for every table of the calibration set (fitted jointly); these two are among
them, so this is in-sample accuracy: median |error| <= 3%, p90 <= 10% per mode and metric, the
PP crossover depth within 10% of the measured one, TG graph slower below 94k. The held-out
accuracy is `graphir calibrate --cv` (docs/cost_model.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.predict import Workload, predict
from reports.sweep import read_table
from reports.sweep_compare import compare, crossover

DATA = Path(__file__).resolve().parents[3] / "backends" / "costmodel" / "data" / "measured"
FILES = {s: DATA / f"qwen3next_80b_iq4xs_q8kv_2x3090_{s}.csv" for s in ("layer", "graph")}


@pytest.fixture(scope="module")
def pred():
    return predict("qwen3-next-80b-a3b", "2x3090", "ik_llama.cpp", "IQ4_XS", "q8_0",
                   workload=Workload(2048, 128, 98304))


@pytest.mark.parametrize("split", ["layer", "graph"])
def test_error_per_mode(pred, split: str) -> None:
    c = compare(read_table(FILES[split]), pred.modes[split].table())
    assert c.summary["unmatched_measured"] == 0
    for m in ("pp", "tg"):
        assert c.summary[m]["median"] <= 0.03, (split, m, c.summary[m])
        assert c.summary[m]["p90"] <= 0.10, (split, m, c.summary[m])


def test_pp_crossover(pred) -> None:
    measured = crossover(read_table(FILES["layer"]), read_table(FILES["graph"]), "pp")
    assert measured is not None and 61000 <= measured <= 68000
    predicted = pred.crossover("pp")
    assert predicted is not None and abs(predicted / measured - 1) <= 0.10


def test_tg_graph_slower_below_94k(pred) -> None:
    layer, graph = pred.modes["layer"].rows, pred.modes["graph"].rows
    for a, b in zip(layer, graph):
        if a.n_kv < 94000:
            assert b.s_tg_tps < a.s_tg_tps, a.n_kv
