"""bench/bench_peer.py's comparison table: every graphir run of a file beside ik's sweep of it."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "bench" / "bench_peer.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["bench_peer"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_each_graphir_variant_of_a_file_gets_its_row(tmp_path: Path) -> None:
    src = ROOT / "docs" / "results" / "h200_2026-12-03"
    shutil.copy(src / "ik_qwen3-8b-q4_0.csv", tmp_path / "ik_qwen3-8b-q4_0.csv")
    shutil.copy(src / "graphir_qwen3-8b-bf16.csv", tmp_path / "graphir_qwen3-8b-bf16.csv")
    table = _bench().comparison(tmp_path)
    # no graphir run of the file itself: its model's bf16 sweep stands in
    assert "| qwen3-8b | q4_0 | qwen3-8b-bf16 | 0 |" in table
    shutil.copy(src / "graphir_qwen3-8b-f16.csv", tmp_path / "graphir_qwen3-8b-q4_0.csv")
    shutil.copy(src / "graphir_qwen3-8b-bf16.csv", tmp_path / "graphir_qwen3-8b-q4_0-kq.csv")
    rows = [r for r in _bench().comparison(tmp_path).splitlines() if r.startswith("| qwen3-8b | q4_0 |")]
    assert [r.split(" | ")[2] for r in rows] == ["qwen3-8b-q4_0"] * 2 + ["qwen3-8b-q4_0-kq"] * 2
    ik = float(rows[0].split(" | ")[4].replace(",", ""))
    gr = float(rows[0].split(" | ")[5].replace(",", ""))
    assert rows[0].split(" | ")[6] == f"{gr / ik:.2f}x"
