"""`graphir run` (the llama-sweep-bench procedure) and `graphir eval` with placements, on CPU
devices: the CUDA paths fall back or skip cleanly without a GPU."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.run import evaluate, run_sweep
from backends.cuda.runtime.session import Session
from backends.cuda.runtime.sweeprun import sweep
from helpers.hf_oracle import hf_logits, hf_model, rel_err, save, torch_threads
from cli.main import main

TINY = {"model_type": "qwen3_next", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 36,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 3, "full_attention_interval": 2}
PROMPT = [5, 3, 9, 1, 1, 7, 2, 8]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("tiny") / "config.json"
    p.write_text(json.dumps(TINY))
    return p


def test_run_csv_columns_and_rows(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.csv"
    assert main(["run", str(tiny), "--devices", "cpu,cpu", "--split", "layer", "--ubatch", "16", "--tg", "4",
                 "--ctx", "48", "--format", "csv", "-o", str(out)]) == 0
    rows = list(csv.reader(line for line in out.read_text().splitlines() if not line.startswith("#")))
    assert rows[0] == ["split", "pp", "tg", "n_kv", "t_pp_s", "s_pp_tps", "t_tg_s", "s_tg_tps"]
    assert [int(r[3]) for r in rows[1:]] == [0, 16, 32]  # one row per u-batch below --ctx
    assert all(r[0] == "layer" and r[1] == "16" and r[2] == "4" for r in rows[1:])
    assert all(float(r[5]) > 0 and float(r[7]) > 0 for r in rows[1:])


def test_run_table_json_and_layers(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tiny), "--devices", "cpu", "--ubatch", "8", "--tg", "2", "--ctx", "16",
                 "--layers", "1:3"]) == 0
    head, _, text = capsys.readouterr().out.partition("\n\n")  # '# model: weights, KV, memory', the table
    assert head.startswith("# tiny0: random weights (seed 0), KV bf16; memory per device (GiB): host ")
    assert text.startswith("|    PP |     TG |   N_KV |") and text.count("\n") == 4
    assert main(["run", str(tiny), "--devices", "cpu,cpu", "--split", "graph", "--recurrent", "split",
                 "--ubatch", "8", "--tg", "2", "--ctx", "8", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["split"] == "graph-split" and len(doc["rows"]) == 1


def test_run_refuses_bad_options(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tiny), "--devices", "cpu,cpu", "--ubatch", "8", "--ctx", "8"]) == 2
    assert "--split" in capsys.readouterr().err
    assert main(["run", str(tiny), "--devices", "cpu", "--format", "xml"]) == 2
    assert main(["run", str(tiny), "--devices", "cuda:7", "--ubatch", "8", "--ctx", "8"]) == 2


def test_sweep_takes_decodes_back_and_keeps_prefills(tiny: Path) -> None:
    """After a row the cache holds exactly the PP tokens, and the recurrent state is the one
    the PP left (the TG steps were taken back)."""
    s = Session(str(tiny), "random", "cpu", 64)
    rows = sweep(s, ubatch=8, tg=3, ctx=24, warm=False, seed=1)
    assert [r.n_kv for r in rows] == [0, 8, 16] and s.n_past == 24
    gen = torch.Generator().manual_seed(1)
    ref = Session(str(tiny), "random", "cpu", 64)
    for _ in rows:  # replay the same random tokens: TG ids, then PP ids
        torch.randint(50, (3,), generator=gen)
        ref.prefill(torch.randint(50, (8,), generator=gen).tolist())
    for k in ref.state:
        assert torch.allclose(s.state[k], ref.state[k], atol=1e-6), k
    assert torch.allclose(s.decode([4]), ref.decode([4]), atol=1e-5)


@st.composite
def placements(draw: st.DrawFn) -> tuple[str, str, str, str]:
    n = draw(st.integers(2, 3))
    ts = ",".join(str(draw(st.integers(0, 3))) for _ in range(n))
    if all(t == "0" for t in ts.split(",")):
        ts = ",".join(["1"] * n)
    return (",".join(["cpu"] * n), draw(st.sampled_from(["layer", "graph"])), ts,
            draw(st.sampled_from(["single", "split"])))


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    model = hf_model("qwen3_next", seed=3, **TINY)
    path = save(model, tmp_path_factory.mktemp("hf"))
    return path, model


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(placement=placements(), merges=st.sampled_from([None, "merge_qkv", "merge_qkv,merge_up_gate"]))
def test_eval_placed_equals_unplaced_and_transformers(hf_tiny, tmp_path: Path, placement, merges) -> None:
    path, model = hf_tiny
    devices, split, ts, recurrent = placement
    plain, placed = tmp_path / "plain.npy", tmp_path / "placed.npy"
    ids = evaluate(str(path), PROMPT, 3, out=str(plain))
    ids2 = evaluate(str(path), PROMPT, 3, devices=devices, split=split, ts=ts, recurrent=recurrent,
                    passes=merges, out=str(placed))
    a, b = np.load(plain), np.load(placed)
    assert ids == ids2
    assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) <= 1e-5
    want = hf_logits(model, PROMPT + ids)
    assert rel_err(torch.from_numpy(b), want) <= 1e-4


def test_eval_cli_flags(hf_tiny, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = hf_tiny
    assert main(["eval", str(path), "--tokens", "1,2,3", "--decode", "2", "--devices", "cpu,cpu,cpu",
                 "--split", "graph", "--ts", "1,2,1", "--max-gpu", "2", "--recurrent", "split",
                 "--passes", "merge_qkv,merge_up_gate"]) == 0
    placed = capsys.readouterr().out
    assert main(["eval", str(path), "--tokens", "1,2,3", "--decode", "2"]) == 0
    assert capsys.readouterr().out == placed
    assert main(["eval", str(path), "--tokens", "1", "--devices", "cpu,cpu"]) == 2
    assert "--split" in capsys.readouterr().err


def test_run_split_auto_on_cpu_devices(tiny: Path, tmp_path: Path) -> None:
    # the auto plan's placements run like any other: rows come out, labelled auto
    out = tmp_path / "auto.csv"
    assert main(["run", str(tiny), "--devices", "cpu,cpu", "--split", "auto", "--hw", "2x3090", "--engine",
                 "ik_llama.cpp", "--dtype", "f32", "--ubatch", "16", "--tg", "2", "--ctx", "32", "--format", "csv",
                 "-o", str(out)]) == 0
    rows = list(csv.reader(line for line in out.read_text().splitlines() if not line.startswith("#")))
    assert [r[0] for r in rows[1:]] == ["auto", "auto"]


def test_eval_split_auto_equals_unplaced(tiny: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["eval", str(tiny), "--tokens", "3,1,4,1,5", "--decode", "2", "--out", str(a)]) == 0
    assert main(["eval", str(tiny), "--tokens", "3,1,4,1,5", "--decode", "2", "--devices", "cpu,cpu",
                 "--split", "auto", "--out", str(b)]) == 0
    x, y = np.load(a), np.load(b)
    assert float(np.abs(x - y).max() / np.abs(x).max()) < 1e-5


def test_run_split_auto_with_a_layer_range(tiny: Path) -> None:
    # the search rebuilds the other phase's graph: it must keep the --layers range
    assert main(["run", str(tiny), "--devices", "cpu,cpu", "--split", "auto", "--hw", "2x3090", "--engine",
                 "ik_llama.cpp", "--dtype", "f32", "--ubatch", "8", "--tg", "2", "--ctx", "16",
                 "--layers", "1:3", "--format", "csv"]) == 0


SEEN: list[tuple[int, int]] = []


def record_context(g, ctx):  # type: ignore[no-untyped-def]  # a `--passes` entry: what the passes are told
    SEEN.append((ctx.ubatch, ctx.ctx_len))
    return g


@pytest.mark.parametrize("split", [None, "layer"])
def test_run_passes_get_the_sweeps_ubatch(split: str | None) -> None:
    """`run -ub N`: the passes after the placement read u-batch N and the context from their
    PassContext (the u-batch once stayed at the context's default, 512)."""
    from cli.run import make_transform
    from graphir.models import BuildOptions, build
    from graphir.models.config import from_hf_dict

    cfg = from_hf_dict(TINY)
    devices = ("cpu:0",) if split is None else ("cpu:0", "cpu:1")
    g = build(cfg, BuildOptions(phase="pp"))
    SEEN.clear()
    for f in make_transform(cfg, devices, split, passes=f"{__name__}:record_context", ctx=1024, ubatch=256):
        g = f(g)
    assert SEEN == [(256, 1024)] and (split is None or g.placed)
