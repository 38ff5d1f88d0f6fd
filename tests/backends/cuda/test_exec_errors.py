"""Bad checkpoints and bad arguments end as one line naming the culprit, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.hf_oracle import hf_model, save, torch_threads
from cli.main import main

CFG = dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return save(hf_model("qwen3", **CFG), tmp_path / "ckpt")


def eval_error(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()  # drop what saving the checkpoint printed
    rc = main(["eval", str(path), "--tokens", "1,2,3", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def edit_tensors(path: Path, fn) -> None:
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_tensor(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    msg = eval_error(ckpt, capsys)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "blk.1.ffn_down.weight" in msg


def test_wrong_shape(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 24)}))
    msg = eval_error(ckpt, capsys)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[8, 24]" in msg and "[16, 24]" in msg


@pytest.mark.parametrize("change,culprit", [
    ({"intermediate_size": 32}, "model.layers.0.mlp.gate_proj.weight"),  # sizes differ
    ({"num_hidden_layers": 3}, "model.layers.2."),  # the file lacks a layer
    ({"num_hidden_layers": 1}, "model.layers.1."),  # the file has a layer too many
    ({"head_dim": 4}, "model.layers.0.self_attn.q_proj.weight"),
])
def test_weights_that_do_not_match_the_config(ckpt: Path, capsys: pytest.CaptureFixture[str], change: dict,
                                              culprit: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(change)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert culprit in eval_error(ckpt, capsys)


def test_bad_arguments(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "outside the vocabulary" in eval_error(ckpt, capsys, "--tokens", "1,99")
    assert "--tokens" in eval_error(ckpt, capsys, "--tokens", "1,x")
    assert "--dtype" in eval_error(ckpt, capsys, "--dtype", "f8")
    assert "--ctx" in eval_error(ckpt, capsys, "--ctx", "2", "--decode", "3")
    assert "unknown device" in eval_error(ckpt, capsys, "--devices", "tpu:0")
    assert "not available" in eval_error(ckpt, capsys, "--devices", "cuda:7")
    assert "split mode" in eval_error(ckpt, capsys, "--devices", "cpu:0,cpu:1")


def test_unreadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = save(hf_model("llama", **CFG), tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    eval_error(ckpt, capsys)
