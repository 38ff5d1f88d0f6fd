"""`--split auto` through cli.main.main: `graphir place` and `graphir predict`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from reports.sweep import read_table
from graphir.text import from_text
from passes import verify_placed

SMALL = ["qwen3-0.6b", "--hw", "2x3090", "--ctx", "8192", "--ubatch", "2048", "--tg", "32"]


def test_predict_auto_rows_and_plan(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", *SMALL, "--split", "layer,graph,auto", "--format", "csv", "-o", str(out)]) == 0
    t = read_table(out)
    assert t.splits() == ("layer", "graph", "auto")
    assert [r.n_kv for r in t.by_split("auto").rows] == [0, 2048, 4096, 6144]
    text = out.read_text()
    assert "# auto placement on 2x3090" in text and "# candidates" in text


def test_predict_auto_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", *SMALL, "--split", "auto"]) == 0
    out = capsys.readouterr().out
    assert "## split mode auto" in out and "the plan and its alternatives" in out and "| # | placement |" in out


def test_place_auto_writes_the_plans_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.txt"
    argv = ["place", "qwen3-8b", "--split", "auto", "--devices", "cpu,cpu", "--phase", "tg", "--quant", "Q4_0",
            "--ctx", "16384", "--ubatch", "1024", "--tg", "64", "--depths", "0,8192", "--weights", "1,2",
            "--format", "text", "-o", str(out)]
    assert main(argv) == 0
    g = from_text(out.read_text())
    verify_placed(g)
    assert g.info["split"] == "auto" and g.info["phase"] == "tg" and g.device_list() == ("cpu:0", "cpu:1")
    assert main(argv[:-4] + ["--format", "summary"]) == 0
    summary = capsys.readouterr().out
    assert "auto placement on 2x3090 (cpu:0, cpu:1)" in summary and "weights PP 1 / TG 2" in summary


@pytest.mark.parametrize("argv, needle", [
    (["place", "qwen3-8b", "--split", "auto", "--depths", "a,b"], "--depths wants N_KV values"),
    (["place", "qwen3-8b", "--split", "auto", "--ctx", "4096", "--depths", "8192"], "depths must lie in [0, ctx=4096)"),
    (["nodes", "qwen3-8b", "--split", "auto"], "--split auto has no closed-form estimate"),
    (["predict", "qwen3-8b", "--split", "layer,rows"], "--split takes layer, graph and/or auto"),
])
def test_auto_cli_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
