"""Tests for reports.sweep: the published 2x3090 sweep-bench tables are the oracle for parsing and
formatting; synthetic tables pin down alignment, statistics and crossover interpolation."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reports.sweep import (
    SweepRow, SweepTable, TableError, format_markdown, parse_table, read_table, to_json, to_jsonl, write_csv,
)
from reports.sweep_compare import compare, crossover, error_stats

DATA = Path(__file__).resolve().parents[2] / "backends" / "costmodel" / "data" / "measured"
STEM = "qwen3next_80b_iq4xs_q8kv_2x3090_"
needs_data = pytest.mark.skipif(not (DATA / f"{STEM}layer.md").is_file(),
                                reason="shared data directory absent")


def shared(split: str, ext: str = "md") -> Path:
    return DATA / f"{STEM}{split}.{ext}"


def synthetic(n: int = 4, ub: int = 512, split: str = "") -> SweepTable:
    return SweepTable(tuple(SweepRow.from_times(ub, 128, k * ub, 0.5 + 0.01 * k, 1.0 + 0.02 * k,
                                                split) for k in range(n)), "synthetic")


# ------------------------------------------------------------------------ shared data, formats

@needs_data
@pytest.mark.parametrize("split", ["layer", "graph"])
def test_markdown_and_csv_of_shared_data_agree(split: str) -> None:
    md, csv_ = read_table(shared(split, "md")), read_table(shared(split, "csv"))
    assert len(md) == len(csv_) == 48
    for a, b in zip(md.rows, csv_.rows):
        assert a == b
    assert [r.n_kv for r in md] == list(range(0, 48 * 2048, 2048))
    assert {(r.pp, r.tg, r.split) for r in md} == {(2048, 128, "")}
    assert md.label == csv_.label == f"{STEM}{split}"


@needs_data
@pytest.mark.parametrize("split", ["layer", "graph"])
def test_format_markdown_reproduces_the_published_table(split: str) -> None:
    path = shared(split, "md")
    table_lines = "".join(ln for ln in path.read_text().splitlines(keepends=True) if ln[0] == "|")
    assert format_markdown(read_table(path)) == table_lines


@needs_data
def test_csv_round_trip_of_shared_data(tmp_path: Path) -> None:
    table = read_table(shared("layer", "csv"))
    out = tmp_path / "again.csv"
    write_csv(table, out, comment="re-written\nby the test")
    assert out.read_text().startswith("# re-written\n# by the test\nsplit,pp,tg,n_kv,")
    back = read_table(out)
    assert back.rows == table.rows and back.label == "again"


@needs_data
def test_graphir_csv_with_several_splits(tmp_path: Path) -> None:
    layer = [replace(r, split="layer") for r in read_table(shared("layer"))]
    graph = [replace(r, split="graph") for r in read_table(shared("graph"))]
    out = tmp_path / "both.csv"
    write_csv(layer + graph, out)
    both = read_table(out)
    assert both.splits() == ("layer", "graph")
    assert both.by_split("graph").rows == tuple(graph)
    assert both.at(2048, "layer") == layer[1]
    with pytest.raises(KeyError):
        both.at(2048)  # one row per split: ambiguous without a split name
    with pytest.raises(KeyError):
        both.by_split("auto")


def test_write_csv_to_a_stream_and_sweep_speeds_from_times() -> None:
    row = SweepRow.from_times(2048, 128, 0, 0.8, 1.6, "layer")
    assert row.s_pp_tps == 2048 / 0.8 and row.s_tg_tps == 80.0
    buf = io.StringIO()
    write_csv([row], buf)
    assert buf.getvalue() == ("split,pp,tg,n_kv,t_pp_s,s_pp_tps,t_tg_s,s_tg_tps\n"
                              "layer,2048,128,0,0.8,2560,1.6,80\n")
    assert parse_table(buf.getvalue()).rows == (row,)


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.csv"
    out.write_text("old\n")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_csv(synthetic(), out)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temp file left behind


def test_jsonl_round_trip(tmp_path: Path) -> None:
    table = SweepTable(synthetic(3).rows + synthetic(3, split="graph").rows)
    out = tmp_path / "t.jsonl"
    out.write_text(to_jsonl(table))
    assert read_table(out).rows == table.rows  # JSON keeps floats exactly


def test_reads_llama_sweep_bench_jsonl_amid_console_output() -> None:
    # the line layout of sweep-bench.cpp's `--output-format jsonl` printf, with log chatter around
    meta = ('"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, '
            '"n_gpu_layers": 99, "n_threads": 16, "n_threads_batch": 16, ')
    text = ("llama_model_loader: loaded meta data\n"
            '{' + meta + '"pp": 512, "tg": 128, "n_kv": 0, "t_pp": 1.100000, "speed_pp": '
            '465.510000, "t_tg": 2.311000, "speed_tg": 55.380000 }\n'
            "======================================== tg_start for n_kv = 512\n"
            '{' + meta + '"pp": 512, "tg": 128, "n_kv": 512, "t_pp": 1.183000, "speed_pp": '
            '432.970000, "t_tg": 1.895000, "speed_tg": 67.550000 }\n'
            "llama_print_timings:        load time =  1234.56 ms\n")
    t = parse_table(text, "run.log")
    assert [(r.n_kv, r.t_pp_s, r.s_tg_tps) for r in t] == [(0, 1.1, 55.38), (512, 1.183, 67.55)]


def test_json_document_and_plain_list() -> None:
    table = synthetic(3, split="auto")
    doc = json.loads(to_json(SweepTable(table.rows, "x"), model="m"))
    assert doc["label"] == "x" and doc["model"] == "m" and len(doc["rows"]) == 3
    assert parse_table(to_json(table)).rows == table.rows
    assert parse_table(json.dumps([asdict(r) for r in table], indent=2)).rows == table.rows


def test_console_capture_with_memory_columns() -> None:
    # `--sweep-memory` adds two columns, which are ignored; log lines around the table too
    head = "|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |"
    text = ("main: n_kv_max = 4096, n_batch = 2048, n_ubatch = 512, flash_attn = 1\n\n"
            f"{head}    RSS HWM | VRAM delta |\n"
            f"|{'-' * 7}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}"
            f"|{'-' * 12}|{'-' * 12}|\n"
            "======================================== tg_start for n_kv = 0\n"
            "|   512 |    128 |      0 |    1.100 |   465.51 |    2.311 |    55.38 |"
            "     1024.0 |        n/a |\n"
            "|   512 |    128 |    512 |    1.183 |   432.97 |    1.895 |    67.55 |"
            "     1030.5 |        n/a |\n"
            "llama_print_timings: total time = 9.9 s\n")
    t = parse_table(text)
    assert [r.n_kv for r in t] == [0, 512] and t.at(512).s_pp_tps == 432.97


def test_speed_that_disagrees_with_time_is_kept_as_printed() -> None:
    text = "pp,tg,n_kv,t_pp_s,s_pp_tps,t_tg_s,s_tg_tps\n2048,128,0,1.0,1900.0,1.0,140.0\n"
    row = parse_table(text).rows[0]  # 2048/1.0 = 2048 is 7% off: still accepted
    assert row.s_pp_tps == 1900.0 and row.s_tg_tps == 140.0


# ------------------------------------------------------------------------ malformed input

HEADER = "pp,tg,n_kv,t_pp_s,s_pp_tps,t_tg_s,s_tg_tps\n"
MD_HEAD = ("|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |\n"
           "|-------|--------|--------|----------|----------|----------|----------|\n")
MD_ROW = "|  2048 |    128 |      0 |    0.897 |  2283.81 |    1.158 |   110.51 |\n"


@pytest.mark.parametrize("name, text, expect", [
    ("missing_column.csv", "pp,tg,t_pp_s,s_pp_tps,t_tg_s,s_tg_tps\n2048,128,0.9,2275.6,1.2,106.7\n",
     ":1: header: missing column(s) n_kv"),
    ("text_cell.csv", "# comment\n" + HEADER + "2048,128,0,abc,2283.81,1.158,110.51\n",
     ":3: non-numeric value 'abc' in column t_pp_s"),
    ("text_cell.md", MD_HEAD + MD_ROW.replace("2283.81", "   fast"), ":3: non-numeric value"),
    ("short_row.csv", HEADER + "2048,128,0,0.897\n", ":2: row has 4 cells, header has 7"),
    ("empty.csv", "", "empty"),
    ("only_comments.md", "# nothing measured\n\n", "empty"),
    ("header_only.csv", HEADER, "empty table"),
    ("broken_row.md", MD_HEAD + MD_ROW + "|  2048 |    128 |   2048 |    0.799 |\n",
     ":4: row has 4 cells, header has 7"),
    ("truncated.md", MD_HEAD + MD_ROW + "|  2048 |    128 |   2048 |    0.799 |  2564.4",
     ":4: row not closed by '|'"),
    ("md_missing_column.md", MD_HEAD.replace("| S_TG t/s |", "| S_XX t/s |") + MD_ROW,
     ":1: header: missing column(s) s_tg_tps"),
    ("prose.txt", "hello\nthis is not a table\n", ":1: unknown format"),
    ("bad.jsonl", '{"pp": 1, "tg": 1, "n_kv": 0, "t_pp": 1, "speed_pp": 1, "t_tg": 1, '
     '"speed_tg": 1}\n{"pp": 1,\n', ":2: invalid JSON line"),
    ("bad.json", '# c\n[\n{"pp": 1},\n', ":3: invalid JSON"),  # line numbers skip comments
    ("not_objects.json", "[1, 2]", "rows[0]: int, not an object"),
    ("null.json", '[{"pp": 512, "tg": 128, "n_kv": 0, "t_pp": null, "speed_pp": 1, "t_tg": 1, '
     '"speed_tg": 1}]', "non-numeric value None in column t_pp_s"),
    ("negative.csv", HEADER + "2048,128,0,-0.9,2283.81,1.158,110.51\n", "non-negative"),
    ("fractional.csv", HEADER + "2048.5,128,0,0.9,2283.81,1.158,110.51\n", "integer"),
])
def test_malformed_input_raises_one_line_table_error(tmp_path: Path, name: str, text: str,
                                                     expect: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TableError) as info:
        read_table(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg and msg.startswith(str(path)) and expect in msg, msg


def test_missing_file_raises_table_error(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="file not found"):
        read_table(tmp_path / "nope.md")


# ------------------------------------------------------------------------ compare, statistics

def test_error_stats_matches_numpy_linear_percentiles() -> None:
    np = pytest.importorskip("numpy")
    errs = [0.1, -0.2, 0.3, -0.4, 0.5, 0.05]
    s = error_stats(errs)
    absv = np.abs(errs)
    assert s["count"] == 6 and s["max"] == 0.5
    assert math.isclose(s["median"], float(np.percentile(absv, 50)))
    assert math.isclose(s["p90"], float(np.percentile(absv, 90)))
    empty = error_stats([])
    assert empty["count"] == 0 and math.isnan(empty["median"])


def test_compare_with_itself_has_zero_error() -> None:
    t = synthetic(6)
    c = compare(t, t)
    assert len(c.rows) == 6 and all(r.ratio_pp == r.ratio_tg == 1.0 for r in c.rows)
    for m in ("pp", "tg"):
        assert c.summary[m] == {"median": 0.0, "p90": 0.0, "max": 0.0, "count": 6, "bias": 0.0}
    assert c.summary["unmatched_measured"] == c.summary["unmatched_predicted"] == 0
    assert "PP: n=6" in c.format()


def test_compare_aligns_rows_when_one_table_is_shorter() -> None:
    measured = synthetic(8)
    predicted = SweepTable(tuple(replace(r, s_pp_tps=r.s_pp_tps * 1.1, s_tg_tps=r.s_tg_tps * 0.8)
                                 for r in measured.rows[::2]))  # every other depth only
    c = compare(measured, predicted)
    assert [r.n_kv for r in c.rows] == [0, 1024, 2048, 3072]
    assert all(math.isclose(r.err_pp, 0.1) and math.isclose(r.err_tg, -0.2) for r in c.rows)
    assert c.summary["pp"]["count"] == 4 and math.isclose(c.summary["tg"]["bias"], -0.2)
    assert c.summary["unmatched_measured"] == 4 and c.summary["unmatched_predicted"] == 0
    assert compare(predicted, measured).summary["unmatched_predicted"] == 4


def test_compare_without_common_depth_raises() -> None:
    t = synthetic(3)
    shifted = SweepTable(tuple(replace(r, n_kv=r.n_kv + 1) for r in t))
    with pytest.raises(TableError, match="no row aligns"):
        compare(t, shifted)


def test_compare_with_splits() -> None:
    measured = synthetic(4)
    both = SweepTable(synthetic(4, split="layer").rows + synthetic(4, split="graph").rows)
    with pytest.raises(TableError, match="by_split"):
        compare(measured, both)  # which split is meant is the caller's call
    assert compare(measured, both.by_split("graph")).summary["pp"]["max"] == 0.0
    c = compare(both, both)  # both name splits: rows align on (split, n_kv)
    assert len(c.rows) == 8 and [r.split for r in c.rows[:5]] == ["layer"] * 4 + ["graph"]


@needs_data
def test_compare_graph_split_against_layer_split() -> None:
    c = compare(read_table(shared("layer")), read_table(shared("graph")))
    print("\n" + c.format())
    assert c.summary["pp"]["count"] == 48 and 0 < c.summary["pp"]["median"] < 1


# ------------------------------------------------------------------------ crossover

def test_crossover_interpolates_between_rows() -> None:
    def table(speeds: list[float]) -> SweepTable:
        return SweepTable(tuple(SweepRow(512, 128, 1000 * k, 512 / s, s, 128 / s, s)
                                for k, s in enumerate(speeds)))
    a, b = table([10, 10, 10, 10]), table([8, 9, 11, 12])
    assert crossover(a, b, "pp") == 1500.0  # diff -1 at 1000, +1 at 2000
    assert crossover(a, b, "tg") == 1500.0
    assert crossover(b, a, "pp") == 0.0  # a is faster from the start
    assert crossover(a, table([5, 6, 7, 8]), "pp") is None
    with pytest.raises(ValueError):
        crossover(a, b, "speed")  # type: ignore[arg-type]
    with pytest.raises(TableError, match="by_split"):
        crossover(SweepTable(synthetic(2, split="x").rows + synthetic(2, split="y").rows), a, "pp")


@needs_data
def test_crossover_on_shared_layer_and_graph_data() -> None:
    layer, graph = read_table(shared("layer")), read_table(shared("graph"))
    pp, tg = crossover(layer, graph, "pp"), crossover(layer, graph, "tg")
    print(f"\ngraph overtakes layer split: PP at N_KV = {pp}, TG at N_KV = {tg}")
    assert pp is not None and 55_000 <= pp <= 70_000
    assert tg is None or tg >= 90_000


# ------------------------------------------------------------------------ properties

times = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)
speeds = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
rows = st.lists(st.builds(SweepRow, pp=st.integers(1, 1 << 16), tg=st.integers(1, 1 << 12),
                          n_kv=st.integers(0, 1 << 22), t_pp_s=times, s_pp_tps=speeds,
                          t_tg_s=times, s_tg_tps=speeds,
                          split=st.sampled_from(["", "layer", "graph", "auto"])),
                min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(rows)
def test_csv_round_trip_is_exact_to_printed_precision(rs: list[SweepRow]) -> None:
    buf = io.StringIO()
    write_csv(rs, buf)
    back = parse_table(buf.getvalue())
    for a, b in zip(rs, back, strict=True):
        assert (a.pp, a.tg, a.n_kv, a.split) == (b.pp, b.tg, b.n_kv, b.split)
        for key, digits in (("t_pp_s", 6), ("s_pp_tps", 3), ("t_tg_s", 6), ("s_tg_tps", 3)):
            assert getattr(b, key) == float(f"{getattr(a, key):.{digits}f}")
    again = io.StringIO()
    write_csv(back, again)
    assert again.getvalue() == buf.getvalue()  # a second round trip changes nothing


@settings(max_examples=100, deadline=None)
@given(rows)
def test_markdown_round_trip_is_exact_to_printed_precision(rs: list[SweepRow]) -> None:
    back = parse_table(format_markdown(rs))
    for a, b in zip(rs, back, strict=True):
        assert (a.pp, a.tg, a.n_kv) == (b.pp, b.tg, b.n_kv)
        assert (b.t_pp_s, b.s_pp_tps) == (float(f"{a.t_pp_s:.3f}"), float(f"{a.s_pp_tps:.2f}"))
        assert (b.t_tg_s, b.s_tg_tps) == (float(f"{a.t_tg_s:.3f}"), float(f"{a.s_tg_tps:.2f}"))
