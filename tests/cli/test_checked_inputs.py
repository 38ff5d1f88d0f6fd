"""Inputs checked before work (issue 15, items 2, 4, 5, 6, 9): weights that are never silently
random, one default weight type stated by every format, placements that must fit, limits with
their numbers, and config values transformers would refuse.

Checkpoints are written by transformers itself (`save_pretrained`: config.json and
safetensors); the bad variants edit or replace the files it wrote.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from backends.cuda.runtime.memcheck import host_available
from backends.cuda.runtime.session import Session
from helpers.hf_oracle import hf_model, save
from backends.cuda.weights.sources import WeightError
from cli.main import main
from graphir.models.config import MAX_LAYERS
from graphir.models.sources import load_source
from reports.sweep import MAX_ROWS

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of a failed command (asserting it is one line)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen3 checkpoint as transformers writes it: config.json + model.safetensors."""
    return save(hf_model("qwen3", **SMALL), tmp_path_factory.mktemp("ckpt") / "qwen3")


def _variant(ckpt: Path, dest: Path, keep: tuple[str, ...] = ("config.json",)) -> Path:
    dest.mkdir()
    for name in keep:
        (dest / name).write_bytes((ckpt / name).read_bytes())
    return dest


def _edited(ckpt: Path, dest: Path, **change: object) -> Path:
    """The checkpoint's config.json with values transformers' own classes refuse."""
    d = _variant(ckpt, dest)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    return d


# ---- item 2: weights are never silently random -------------------------------------------------

def test_pickle_checkpoint_is_refused_naming_the_file(ckpt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    d = _variant(ckpt, tmp_path / "bin")
    state = hf_model("qwen3", **SMALL).state_dict()
    torch.save(state, d / "pytorch_model.bin")  # what save_pretrained(safe_serialization=False) wrote
    capsys.readouterr()
    assert main(["eval", str(d), "--tokens", "1,2,3"]) == 2
    err = _err(capsys)
    assert "pytorch_model.bin" in err and "pickle" in err and "safetensors" in err
    assert main(["run", str(d), "--devices", "cpu", "--ubatch", "4", "--tg", "2", "--ctx", "8"]) == 2
    assert "pytorch_model.bin" in _err(capsys)


def test_config_only_directory_needs_random_weights(ckpt: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    d = _variant(ckpt, tmp_path / "cfg")
    capsys.readouterr()
    assert main(["eval", str(d), "--tokens", "1,2,3", "--decode", "2"]) == 2
    err = _err(capsys)
    assert "no weights (found config.json only)" in err and "--random-weights" in err
    with pytest.raises(WeightError, match="no weights"):  # the library refuses as the CLI does
        Session(load_source(d), None, "cpu", 8)
    assert main(["eval", str(d), "--tokens", "1,2,3", "--decode", "2", "--random-weights"]) == 0
    out = capsys.readouterr()
    assert "random weights (seed 0)" in out.err
    # the bare config.json has no weights at all: random, and said so in the header
    assert main(["eval", str(d / "config.json"), "--tokens", "1,2,3", "--decode", "2"]) == 0
    bare = capsys.readouterr()
    assert "random weights" in bare.err and bare.out == out.out


def test_checkpoint_runs_on_its_own_weights_and_says_so(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--tokens", "1,2,3", "--decode", "2"]) == 0
    own = capsys.readouterr()
    assert "random" not in own.err and "checkpoint's torch_dtype" in own.err
    assert main(["eval", str(ckpt), "--tokens", "1,2,3", "--decode", "2", "--random-weights"]) == 0
    rnd = capsys.readouterr()
    assert "random weights" in rnd.err
    assert main(["eval", str(ckpt / "config.json"), "--tokens", "1,2,3", "--decode", "2"]) == 0
    assert capsys.readouterr().out == rnd.out  # --random-weights: the config's seeded weights


def test_sharded_checkpoint_with_a_missing_shard_is_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "sharded"
    hf_model("qwen3", **SMALL).save_pretrained(d, max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    capsys.readouterr()
    assert main(["eval", str(d), "--tokens", "1,2"]) == 0  # whole: it runs on its weights
    capsys.readouterr()
    (d / shards[-1]).unlink()
    assert main(["eval", str(d), "--tokens", "1,2"]) == 2
    assert shards[-1] in _err(capsys)
    (d / shards[-1]).write_bytes(b"\xff" * 64)  # a damaged header
    assert main(["eval", str(d), "--tokens", "1,2"]) == 2
    err = _err(capsys)
    assert shards[-1] in err and "not a safetensors file" in err


# ---- item 4: one default weight type, stated with the KV type and GiB per GPU -----------------

def test_predict_states_weights_kv_and_memory_in_every_format(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", "qwen3-0.6b", "--hw", "2x3090", "--kv-type", "q8_0", "--ctx", "4096", "--split", "layer"]
    capsys.readouterr()
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "weights bf16 (assumed: preset has no weights; pass --quant)" in table
    assert "KV q8_0" in table and "memory per GPU (GiB" in table
    out = tmp_path / "p.csv"
    assert main(args + ["--format", "csv", "-o", str(out)]) == 0
    comments = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("weights bf16" in c and "KV q8_0" in c and "GiB" in c for c in comments)
    assert main(args + ["--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["weights"].startswith("weights bf16") and doc["kv_type"] == "q8_0"
    assert len(doc["memory_GiB_per_gpu"]["layer"]) == 2 and doc["gpu_memory_GiB"] > 0
    # the default is what --quant bf16 prices (the old default of predict was Q4_K_M)
    assert main(args + ["--format", "json", "--quant", "bf16"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert explicit["memory_GiB_per_gpu"] == doc["memory_GiB_per_gpu"]
    assert explicit["modes"]["layer"]["rows"] == doc["modes"]["layer"]["rows"]


def test_place_and_predict_share_the_default_weight_type(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["place", "qwen3-0.6b", "--split", "layer", "--devices", "2"]) == 0
    placed = capsys.readouterr().out
    assert main(["predict", "qwen3-0.6b", "--ctx", "4096", "--split", "layer"]) == 0
    predicted = capsys.readouterr().out
    label = "weights bf16 (assumed: preset has no weights; pass --quant)"
    assert label in placed and label in predicted and "KV f16" in placed


# ---- item 5: a placement that does not fit is an error, in every format -----------------------

@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_predict_that_does_not_fit_is_an_error(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"p.{fmt}"
    args = ["predict", "qwen3-32b", "--hw", "2x3090", "--ctx", "8192", "--format", fmt, "-o", str(out)]
    capsys.readouterr()
    assert main(args) == 2
    err = _err(capsys)
    assert "does not fit" in err and "GiB" in err and "--allow-overflow" in err
    assert not out.exists()
    assert main(args + ["--allow-overflow"]) == 0
    assert "warning: " in capsys.readouterr().err
    assert "GiB" in out.read_text()


def test_timeline_that_does_not_fit_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.csv"
    capsys.readouterr()
    assert main(["timeline", "qwen3-32b", "--hw", "2x3090", "-o", str(out)]) == 2
    assert "does not fit" in _err(capsys) and not out.exists()
    assert main(["timeline", "qwen3-32b", "--hw", "2x3090", "--allow-overflow", "-o", str(out)]) == 0
    assert "GiB" in out.read_text().splitlines()[1]
    rows = list(csv.DictReader(line for line in out.open() if not line.startswith("#")))
    assert {r["device"] for r in rows} == {"cuda:0", "cuda:1"}


@pytest.mark.parametrize("verb", ["predict", "timeline"])
@pytest.mark.parametrize("n", ["0", "3", "-1"])
def test_gpus_outside_the_system_is_an_error(verb: str, n: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = ["-o", str(tmp_path / "t.csv")] if verb == "timeline" else []
    capsys.readouterr()
    assert main([verb, "qwen3-0.6b", "--hw", "2x3090", "--gpus", n, "--ctx" if verb == "predict" else "--depth",
                 "4096" if verb == "predict" else "0", *out]) == 2
    assert f"--gpus {n}: 2x3090 has 2 GPU(s); use 1..2" in _err(capsys)


def test_place_with_mem_allows_overflow_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["place", "qwen3-32b", "--split", "layer", "--mem", "2x3090", "--ctx", "8192"]
    capsys.readouterr()
    assert main(args) == 2
    assert "does not fit" in _err(capsys)
    assert main(args + ["--allow-overflow"]) == 0
    res = capsys.readouterr()
    assert "warning: does not fit" in res.err and "of 22.35 GiB" in res.out


# ---- item 6: limits checked before work, with the numbers -------------------------------------

def test_sweep_with_too_many_rows_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["predict", "qwen3-8b", "--ctx", str(1024 * (MAX_ROWS + 1)), "--ubatch", "1024"]) == 2
    assert f"gives {MAX_ROWS + 1:,} rows" in _err(capsys)
    assert main(["run", "qwen3-0.6b", "--devices", "cpu", "--ctx", "100000", "--ubatch", "1"]) == 2
    assert "100,000 rows" in _err(capsys)


def test_layer_count_beyond_the_maximum_is_refused(ckpt: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for n in (MAX_LAYERS + 1, 10**9):
        d = _edited(ckpt, tmp_path / f"l{n}", num_hidden_layers=n)
        capsys.readouterr()
        assert main(["stats", str(d)]) == 2
        assert f"num_hidden_layers={n} exceeds the maximum of {MAX_LAYERS}" in _err(capsys)


def test_cpu_eval_beyond_host_memory_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    have = host_available()
    if have is None or have > 900 * 2**30:  # qwen3-235b in f32 is 876 GiB
        pytest.skip("host memory unknown here, or large enough for qwen3-235b-a22b in f32")
    capsys.readouterr()
    assert main(["eval", "qwen3-235b-a22b", "--tokens", "1,2,3"]) == 2
    err = _err(capsys)
    assert "host needs 875.79 GiB" in err and "weights 875.79 GiB in f32" in err


def test_host_available_reads_meminfo(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    assert host_available(f) == 20000000 * 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_eval_beyond_free_memory_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", "qwen3-235b-a22b", "--tokens", "1", "--devices", "cuda:0", "--dtype", "bf16"]) == 2
    assert "does not fit (free GPU memory" in _err(capsys)


# ---- item 9: config values checked as transformers checks them --------------------------------

@pytest.mark.parametrize("change,field", [
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers"),
    ({"num_attention_heads": "4"}, "num_attention_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -10000.0}}, "rope_theta"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
])
def test_invalid_config_values_are_refused(change: dict, field: str, ckpt: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    d = _edited(ckpt, tmp_path / "bad", **change)
    capsys.readouterr()
    for verb in (["stats", str(d)], ["eval", str(d / "config.json"), "--tokens", "1,2"]):
        assert main(verb) == 2
        assert field in _err(capsys)


def test_llama_hidden_must_be_a_multiple_of_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = save(hf_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2), tmp_path / "llama")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["head_dim"]  # derived from hidden / heads, which must then be whole
    (d / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3, "num_key_value_heads": 1}))
    capsys.readouterr()
    assert main(["stats", str(d)]) == 2  # was: head_dim 32 // 3 = 10, silently
    assert "hidden_size=32 is not a multiple of num_attention_heads=3" in _err(capsys)


def test_moe_sparse_step_zero_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = save(hf_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16), tmp_path / "moe")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "decoder_sparse_step": 0}))
    capsys.readouterr()
    assert main(["stats", str(d)]) == 2  # was a ZeroDivisionError: "internal error", rc 1
    assert "decoder_sparse_step=0" in _err(capsys)


def test_ubatch_above_ctx_is_clamped_and_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", "qwen3-0.6b", "--ctx", "100", "--split", "layer", "--format", "csv", "-o", str(out)]) == 0
    text = out.read_text()
    assert "# note: u-batch 2048 clamped to the context 100" in text
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    assert [(r["pp"], r["n_kv"]) for r in rows] == [("100", "0")]
    assert main(["run", "qwen3-0.6b", "--devices", "cpu", "--layers", "0:1", "--ctx", "8", "--ubatch", "64",
                 "--tg", "1", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["pp"] for r in doc["rows"]] == [8] and "clamped" in doc["meta"]["notes"][0]
