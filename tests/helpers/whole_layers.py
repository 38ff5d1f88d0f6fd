"""Checks shared by the families ik_llama.cpp splits by layer only (gemma3, gemma4: absent from
its is_model_split_supported, so `-sm graph` falls back to layer and place_graph places whole
layers as place_layer does): logits of the placed checkpoint against transformers, the CLI
under graph split, and predict on every rig with both split modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from graphir.models import from_hf_dict
from graphir.ops import Op
from helpers.cli_oracle import cli_eval, placement
from helpers.hf_oracle import check_logits, hf_model, save

TOL = 1e-4
# (mode, devices, ts): uneven shares, more devices than a tiny model has layers
SPLITS = [("layer", 2, "1,2"), ("layer", 3, "2,1,1"), ("graph", 2, "1,3"), ("graph", 4, "1,2,1,3")]
RIGS = ["2x3090", "4x3090", "2xH200"]


def check_split(arch: str, config: dict[str, Any], prompt: list[int], mode: str, n: int, ts: str, path: Path) -> None:
    """`--split mode --ts ts` over n CPU devices equals transformers, with whole layers per device
    and no all-reduce (graph split is the layer split it runs as)."""
    cfg = from_hf_dict(dict(config, model_type=f"{arch}_text"))
    placed: list[Any] = []
    transform = placement(cfg, tuple(f"cpu:{k}" for k in range(n)), mode, ts, placed)
    check_logits(arch, config, path, prompt, 4, transform=transform)
    g = placed[-1]
    assert len(g.device_list()) == min(n, cfg.n_layer) and not g.by_op(Op.ALL_REDUCE)


def check_cli_graph_split(arch: str, config: dict[str, Any], prompt: list[int], path: Path) -> None:
    """`graphir eval --split graph` over three CPU devices: transformers' logits and greedy tokens."""
    model = hf_model(arch, **config)
    err, generated, greedy_ref = cli_eval(model, save(model, path), prompt, 4, "--devices", "cpu,cpu,cpu",
                                          "--split", "graph", "--ts", "1,3,1")
    assert err < TOL and generated == greedy_ref


def check_predict(preset: str, rig: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`graphir predict` in Q4_K_M prices both split modes (graph as the layer split it runs as)."""
    assert main(["predict", preset, "--hw", rig, "--split", "layer,graph", "--quant", "Q4_K_M",
                 "--ctx", "16384"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "## split mode layer" in out and "## split mode graph" in out
