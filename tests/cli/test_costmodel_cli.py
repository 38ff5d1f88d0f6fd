"""`graphir predict`, `graphir calibrate`, `graphir compare` end to end through cli.main.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from backends.costmodel.profiles import engine_yaml, load_engine
from cli.main import main
from reports.sweep import read_table

DATA = Path(__file__).resolve().parents[2] / "backends" / "costmodel" / "data" / "measured"
SMALL = ["qwen3-0.6b", "--hw", "2x3090", "--ctx", "8192", "--ubatch", "2048", "--tg", "32"]


def test_predict_csv(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", *SMALL, "--format", "csv", "-o", str(out)]) == 0
    header = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")][0]
    assert header == "split,pp,tg,n_kv,t_pp_s,s_pp_tps,t_tg_s,s_tg_tps"
    t = read_table(out)
    assert t.splits() == ("layer", "graph")
    assert [r.n_kv for r in t.by_split("layer").rows] == [0, 2048, 4096, 6144]


def test_predict_table_json_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "p.png"
    assert main(["predict", *SMALL, "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "crossover depth" in text and "dominant term" in text and "PP dominant" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["predict", *SMALL, "--format", "json", "--split", "graph"]) == 0
    doc = json.loads(capsys.readouterr().out)
    mode = doc["modes"]["graph"]
    assert len(mode["rows"]) == 4 and set(mode["breakdown_s"]["tg_per_token"]) >= {"compute", "comm", "launch"}
    assert len(mode["utilisation"]["pp"][0]) == 2 and mode["energy_j_per_token"]["tg"][0] > 0


@pytest.mark.parametrize("args", [
    ["predict", "qwen3-0.6b", "--split", "row"],
    ["predict", "qwen3-0.6b", "--hw", "nonsense"],
    ["predict", "no-such-model"],
    ["predict", "qwen3-0.6b", "--engine", "nope"],
    ["predict", "qwen3-0.6b", "--ts", "a,b"],
    ["predict", "qwen3-0.6b", "--ubatch", "0"],
    ["compare", "/nonexistent/a.csv", "/nonexistent/b.csv"],
])
def test_user_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_calibrate_recovers_a_parameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = load_engine("ik_llama.cpp")
    meas = tmp_path / "meas.csv"
    assert main(["predict", *SMALL, "--split", "layer,graph", "--format", "csv", "-o", str(meas)]) == 0
    start = tmp_path / "start.yaml"
    start.write_text(engine_yaml(truth.model_copy(update={"attn_pp_eff": 0.3, "priors": {}})))
    fitted = tmp_path / "fitted.yaml"
    assert main(["calibrate", str(meas), "--model", "qwen3-0.6b", "--hw", "2x3090", "--engine", str(start),
                 "--fit", "attn_pp_eff", "-o", str(fitted)]) == 0
    assert "attn_pp_eff" in capsys.readouterr().out
    doc = yaml.safe_load(fitted.read_text())
    assert doc["attn_pp_eff"] == pytest.approx(truth.attn_pp_eff, rel=0.05)
    assert doc["calibration"]["data"] == ["meas.csv"]
    # refitting a profile in place keeps the comment it opens with, and only that
    fitted.write_text("# where these numbers come from\n# (second line)\n" + fitted.read_text() + "# tail\n")
    assert main(["calibrate", str(meas), "--model", "qwen3-0.6b", "--hw", "2x3090", "--engine", str(fitted),
                 "--fit", "attn_pp_eff", "-o", str(fitted)]) == 0
    text = fitted.read_text()
    assert text.startswith("# where these numbers come from\n# (second line)\nname: ") and "# tail" not in text
    assert load_engine(str(fitted)).attn_pp_eff == pytest.approx(truth.attn_pp_eff, rel=0.05)


def test_compare_measured_with_predicted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = tmp_path / "pred.csv"
    assert main(["predict", "qwen3-next-80b-a3b", "--hw", "2x3090", "--quant", "IQ4_XS", "--kv-type", "q8_0",
                 "--format", "csv", "-o", str(pred)]) == 0
    assert main(["compare", str(DATA / "qwen3next_80b_iq4xs_q8kv_2x3090_graph.md"), str(pred), "--split", "graph"]) == 0
    out = capsys.readouterr().out
    assert "PP: n=48" in out and "TG: n=48" in out


def test_calibrate_takes_a_model_per_table_and_run_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """graphir run's labels (graph-single / graph-split) and one --model per table."""
    from reports.sweep import SweepRow, write_csv

    a, b = tmp_path / "next.csv", tmp_path / "dense.csv"
    assert main(["predict", "qwen3-next-80b-a3b", "--hw", "2xH200", "--engine", "graphir-cuda", "--quant", "bf16",
                 "--split", "graph", "--recurrent", "split", "--ctx", "4096", "--tg", "8", "--format", "csv",
                 "-o", str(a)]) == 0
    rows = [SweepRow(**{**r.__dict__, "split": "graph-split"}) for r in read_table(a).rows]
    write_csv(rows, a)
    assert main(["predict", *SMALL[:1], "--hw", "2xH200", "--engine", "graphir-cuda", "--split", "layer", "--ctx",
                 "4096", "--tg", "8", "--format", "csv", "-o", str(b)]) == 0
    assert main(["calibrate", str(a), str(b), "--model", "qwen3-next-80b-a3b,qwen3-0.6b", "--hw", "2xH200",
                 "--engine", "graphir-cuda", "--quant", "bf16", "--fit", "gemm_eff"]) == 0
    out = capsys.readouterr().out
    assert "next:graph-split" in out and "dense:layer" in out
    # the tables are the engine's own predictions: the fit leaves them where they are
    assert "|err| median 0.0%" in out
    # compare aligns a measured graph-split table with a predicted graph one
    c = tmp_path / "pred.csv"
    assert main(["predict", "qwen3-next-80b-a3b", "--hw", "2xH200", "--engine", "graphir-cuda", "--quant", "bf16",
                 "--split", "graph", "--recurrent", "split", "--ctx", "4096", "--tg", "8", "--format", "csv",
                 "-o", str(c)]) == 0
    assert read_table(c).splits() == ("graph",)
    assert main(["compare", str(a), str(c)]) == 0
    assert "graph-split" in capsys.readouterr().out
    assert main(["calibrate", str(a), str(b), "--model", "a,b,c", "--hw", "2xH200"]) == 2
    assert "one per table" in capsys.readouterr().err


def test_run_labels() -> None:
    from cli.predict import CostModelCliError, run_label

    assert run_label("graph-split") == ("graph", "split")
    assert run_label("graph", "split") == ("graph", "split")
    assert run_label("layer") == ("layer", "single")
    with pytest.raises(CostModelCliError):
        run_label("layer-split")
