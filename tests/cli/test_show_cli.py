"""The picture verbs end to end through cli.main.main: `show`, `timeline`, `predict --plot
--measured`, `compare` (sweep-bench markdown against a graphir prediction CSV, --plot, errors)."""

from __future__ import annotations

import csv
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cli.main import main

PNG = b"\x89PNG\r\n\x1a\n"
QN = ["qwen3-next-80b-a3b", "--quant", "IQ4_XS"]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    return err


@needs_dot
def test_show_writes_svg_png_and_dot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg, png, gv = tmp_path / "placed.svg", tmp_path / "ops.png", tmp_path / "placed.dot"
    assert main(["show", *QN, "--split", "graph", "--devices", "2", "-o", str(svg)]) == 0
    assert ET.fromstring(svg.read_bytes()).tag.endswith("svg")
    assert main(["show", *QN, "--split", "graph", "--view", "ops", "--layers", "3:4", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG
    assert main(["show", "qwen3-0.6b", "--split", "layer", "--devices", "cpu,cpu", "-o", str(gv)]) == 0
    assert gv.read_text().startswith("digraph layers") and "cpu:1" in gv.read_text()


def test_show_text_prints_the_placed_ir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", *QN, "--split", "graph", "--format", "text", "--layers", "3:4"]) == 0
    out = capsys.readouterr().out
    assert "%blk.3.attn_residual : f32[T,2048] @cuda:0,cuda:1 = all_reduce(" in out
    assert "%blk.3.attn_q#1 : f32[T,4096] @cuda:1 = matmul(" in out and "blk.4." not in out


@pytest.mark.parametrize("args", [
    ["show", "qwen3-0.6b", "--split", "row"],
    ["show", "qwen3-0.6b", "--split", "graph", "--format", "png"],  # PNG needs a file
    ["show", "qwen3-0.6b", "--split", "graph", "--format", "jpeg"],
    ["show", "qwen3-0.6b", "--split", "graph", "--view", "boxes"],
    ["show", "qwen3-0.6b", "--split", "graph", "--layers", "0:99"],
    ["show", "qwen3-0.6b", "--pass", "merge_qkv", "--format", "dot"],  # the layer view needs a placement
    ["timeline", "qwen3-0.6b", "-o", "t.gif"],
    ["timeline", "qwen3-0.6b", "--split", "row", "-o", "t.png"],
])
def test_show_and_timeline_user_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    one_line_error(capsys)


@pytest.fixture(scope="module")
def trace_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("tl") / "trace.csv"
    assert main(["timeline", *QN, "--hw", "2x3090", "--kv-type", "q8_0", "--split", "graph", "-o", str(out)]) == 0
    return list(csv.DictReader(line for line in out.open() if not line.startswith("#")))


def test_timeline_trace_shows_the_second_gpu_idle_during_a_delta_net_layer(trace_rows: list[dict[str, str]]) -> None:
    pp = [r for r in trace_rows if r["phase"] == "pp"]
    assert {r["device"] for r in pp} == {"cuda:0", "cuda:1"}
    assert {"matmul", "MoE", "attention", "delta-net", "comm"} <= {r["kind"] for r in pp}
    dn = next(r for r in pp if r["node"] == "blk.0.delta_net")  # layer 0's mixer runs whole on cuda:0
    lo, hi = float(dn["start_s"]), float(dn["end_s"])
    assert dn["device"] == "cuda:0" and hi > lo
    assert not [r for r in pp if r["device"] == "cuda:1" and float(r["start_s"]) < hi and float(r["end_s"]) > lo]
    # an all-reduce occupies both GPUs at once
    ar = [r for r in pp if r["node"] == "blk.3.attn_residual"]
    assert {r["device"] for r in ar} == {"cuda:0", "cuda:1"} and len({r["start_s"] for r in ar}) == 1


def test_timeline_draws_png_and_svg(tmp_path: Path) -> None:
    png, svg = tmp_path / "t.png", tmp_path / "t.svg"
    assert main(["timeline", "qwen3-0.6b", "--hw", "2x3090", "--split", "graph", "--depth", "4096",
                 "--ubatch", "512", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG
    assert main(["timeline", "qwen3-0.6b", "--split", "layer", "-o", str(svg)]) == 0
    root = ET.fromstring(svg.read_bytes())
    assert root.tag.endswith("svg") and b"<dc:date>" not in svg.read_bytes()  # no date: reproducible


@pytest.fixture(scope="module")
def prediction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "prediction.csv"
    assert main(["predict", *QN, "--hw", "2x3090", "--kv-type", "q8_0", "--format", "csv", "-o", str(out)]) == 0
    return out


def test_compare_markdown_with_a_prediction_of_several_splits(shared_data: Path, prediction: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    layer_md = shared_data / "qwen3next_80b_iq4xs_q8kv_2x3090_layer.md"
    assert main(["compare", str(layer_md), str(prediction)]) == 0  # the split comes from the file name
    out = capsys.readouterr().out
    assert out.startswith("split") and "layer " in out and "graph " not in out
    assert "PP: n=48" in out and "TG: n=48" in out and "unmatched rows: 0 measured" in out


def test_compare_reads_the_json_of_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = ["qwen3-0.6b", "--ctx", "8192", "--tg", "16"]
    pj, pc = tmp_path / "p.json", tmp_path / "p.csv"
    assert main(["predict", *small, "--format", "json", "-o", str(pj)]) == 0
    assert main(["predict", *small, "--format", "csv", "-o", str(pc)]) == 0
    capsys.readouterr()
    assert main(["compare", str(pc), str(pj)]) == 0  # both carry both splits: aligned split by split
    out = capsys.readouterr().out
    assert "(split layer)" in out and "(split graph)" in out and "max 0.0%" in out


def test_compare_several_tables_and_plot(shared_data: Path, prediction: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # the prediction as the reference: each later table meets the split its name or column gives
    png = tmp_path / "cmp.png"
    jsonl = tmp_path / "graph_run.jsonl"
    rows = list(csv.DictReader(line for line in (shared_data / "qwen3next_80b_iq4xs_q8kv_2x3090_graph.csv").open()
                               if not line.startswith("#")))
    jsonl.write_text("".join('{"pp": %s, "tg": %s, "n_kv": %s, "t_pp": %s, "speed_pp": %s, "t_tg": %s, '
                             '"speed_tg": %s}\n' % tuple(r[k] for k in ("pp", "tg", "n_kv", "t_pp_s", "s_pp_tps",
                                                                       "t_tg_s", "s_tg_tps")) for r in rows))
    assert main(["compare", str(prediction), str(jsonl), str(shared_data / "qwen3next_80b_iq4xs_q8kv_2x3090_layer.md"),
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "== prediction.csv vs graph_run.jsonl (split graph)" in out
    assert "== prediction.csv vs qwen3next_80b_iq4xs_q8kv_2x3090_layer.md (split layer)" in out
    assert png.read_bytes()[:8] == PNG


def test_compare_errors_are_one_line(shared_data: Path, prediction: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.md"
    text = (shared_data / "qwen3next_80b_iq4xs_q8kv_2x3090_layer.md").read_text().splitlines()
    bad.write_text("\n".join(text[:5] + [text[5][:30]]) + "\n")  # a row cut short
    assert main(["compare", str(bad), str(prediction)]) == 2
    assert "bad.md:6" in one_line_error(capsys)
    nosplit = tmp_path / "run.md"  # no split column, no split in the name: ambiguous against two splits
    nosplit.write_text("\n".join(text) + "\n")
    assert main(["compare", str(nosplit), str(prediction)]) == 2
    assert "--split" in one_line_error(capsys)
    assert main(["compare", str(nosplit), str(prediction), "--split", "layer"]) == 0
    capsys.readouterr()
    assert main(["compare", str(nosplit)]) == 2
    one_line_error(capsys)


def test_predict_plot_with_measured_points(shared_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "p.png"
    assert main(["predict", *QN, "--kv-type", "q8_0", "--ctx", "16384", "--plot", str(png),
                 "--measured", str(shared_data / "qwen3next_80b_iq4xs_q8kv_2x3090_layer.md"),
                 "--measured", str(shared_data / "qwen3next_80b_iq4xs_q8kv_2x3090_graph.csv")]) == 0
    assert png.read_bytes()[:8] == PNG
    capsys.readouterr()
    assert main(["predict", "qwen3-0.6b", "--ctx", "4096", "--plot", str(png), "--measured",
                 str(shared_data / "qwen3next_80b_iq4xs_q8kv_2x3090_layer.md"), "--split", "graph"]) == 2
    one_line_error(capsys)
