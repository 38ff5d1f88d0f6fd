"""The IR verbs (models, lower, stats) through cli.main.main, output captured.

Oracles: the library functions the verbs wrap (build, graph_stats, from_json), and for the
error cases the contract: exit code 2, exactly one line on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from graphir import fileio
from cli.main import main
from graphir.graph import verify
from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset, preset_names
from graphir.serialize import from_json
from graphir.stats import graph_stats
from graphir.text import from_text

QN = "qwen3-next-80b-a3b"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_every_preset(capsys):
    code, out, err = run(capsys, "models")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines] == preset_names()
    qn = next(ln for ln in lines if ln.startswith(QN + " "))
    assert "qwen3_next" in qn and "512x top-10" in qn and "recurrent 36" in qn


def test_lower_summary(capsys):
    code, out, err = run(capsys, "lower", QN, "--phase", "tg", "--format", "summary")
    assert code == 0 and err == ""
    g = build(load_preset(QN), BuildOptions(phase="tg"))
    assert "phase=tg layers=0:48" in out
    assert f"nodes {len(g)} " in out
    assert "delta_net" in out and "attention" in out
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines()[2:]}
    assert counts["delta_net"] == 36 and counts["attention"] == 12 and counts["moe_topk"] == 48


@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_lower_json_parses(capsys, phase):
    code, out, err = run(capsys, "lower", QN, "--phase", phase, "--format", "json")
    assert code == 0 and err == ""
    g = from_json(out)
    verify(g)
    assert g == build(load_preset(QN), BuildOptions(phase=phase))


def test_lower_text_with_quant_parses(capsys):
    code, out, err = run(capsys, "lower", QN, "--phase", "tg", "--quant", "IQ4_XS", "--kv-type", "q8_0",
                         "--layers", "2:4")
    assert code == 0 and err == ""
    g = from_text(out)
    verify(g)
    assert g.info["quant"] == "IQ4_XS" and g.info["kv_type"] == "q8_0" and g.info["layers"] == "2:4"
    assert g["blk.3.cache_k"].spec.dtype.name == "q8_0"
    assert g["blk.2.ffn_gate_exps.weight"].spec.dtype.name == "iq4_xs"
    assert "blk.1.attn_norm" not in g and "blk.4.attn_norm" not in g


def test_lower_dot_layers(capsys):
    code, out, err = run(capsys, "lower", QN, "--layers", "0:4", "--format", "dot")
    assert code == 0 and err == ""
    assert out.startswith("digraph graphir {") and out.rstrip().endswith("}")
    assert '"blk.3.kqv"' in out and '"blk.0.delta_net"' in out and '"blk.4.' not in out


def test_stats_json(capsys):
    code, out, err = run(capsys, "stats", QN, "--format", "json")
    assert code == 0 and err == ""
    d = json.loads(out)
    s = graph_stats(build(load_preset(QN), BuildOptions(phase="tg")))
    for key in ("params_total", "params_active", "weight_bytes", "kv_bytes_per_token", "recurrent_bytes_per_seq"):
        assert d[key] == getattr(s, key), key
    assert d["params_total"] == 79_674_391_296
    assert d["model"] == QN and d["arch"] == "qwen3_next"


def test_stats_table_with_quant(capsys):
    code, out, err = run(capsys, "stats", QN, "--quant", "IQ4_XS", "--kv-type", "q8_0")
    assert code == 0 and err == ""
    assert "79,674,391,296" in out and "13,056" in out and "IQ4_XS" in out


def test_output_file_is_written_atomically(capsys, tmp_path):
    target = tmp_path / "sub" / "g.json"
    target.parent.mkdir()  # -o never creates folders: a mistyped one is an error
    code, out, err = run(capsys, "lower", QN, "--phase", "tg", "--format", "json", "-o", str(target))
    assert code == 0 and out == "" and err == ""
    assert from_json(target.read_text()) == build(load_preset(QN), BuildOptions(phase="tg"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["g.json"]  # no temporary left behind
    # a failing verb leaves the previous file untouched
    before = target.read_bytes()
    code, _, err = run(capsys, "lower", QN, "--layers", "0:99", "-o", str(target))
    assert code == 2 and target.read_bytes() == before


def test_output_file_survives_a_failed_write(capsys, tmp_path, monkeypatch):
    target = tmp_path / "g.txt"
    target.write_text("old\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    code, out, err = run(capsys, "lower", QN, "--layers", "0:1", "-o", str(target))
    assert code == 2
    assert err.count("\n") == 1 and "No space left on device" in err
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["g.txt"]


# ---- errors: exit code 2, one line on stderr, no traceback --------------------------------

def _tiny_gguf(path: Path) -> None:
    w = GGUFWriter(str(path), "llama")
    for k, v in (("block_count", 1), ("context_length", 128), ("embedding_length", 64),
                 ("feed_forward_length", 128), ("attention.head_count", 4), ("attention.head_count_kv", 4)):
        w.add_uint32(f"llama.{k}", v)
    w.add_uint32("llama.vocab_size", 32)
    shapes = {"token_embd.weight": (32, 64), "output_norm.weight": (64,), "blk.0.attn_norm.weight": (64,),
              "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (64, 64), "blk.0.attn_v.weight": (64, 64),
              "blk.0.attn_output.weight": (64, 64), "blk.0.ffn_norm.weight": (64,),
              "blk.0.ffn_gate.weight": (128, 64), "blk.0.ffn_up.weight": (128, 64), "blk.0.ffn_down.weight": (64, 128)}
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GOOD_CFG = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)


def _case(kind: str, tmp: Path) -> list[str]:
    if kind == "malformed_json":
        p = tmp / "config.json"
        p.write_text('{"model_type": "llama", "vocab_size": 64,\n  "hidden_size": }')
        return ["lower", str(p)]
    if kind == "unknown_model_type":
        p = tmp / "config.json"
        p.write_text(json.dumps(dict(GOOD_CFG, model_type="gpt_bigcode")))
        return ["lower", str(p)]
    if kind in ("truncated_gguf", "truncated_gguf_header"):
        good = tmp / "good.gguf"
        _tiny_gguf(good)
        blob = good.read_bytes()
        p = tmp / "cut.gguf"
        p.write_bytes(blob[: len(blob) - 1000] if kind == "truncated_gguf" else blob[:150])
        return ["lower", str(p)]
    if kind == "inconsistent_heads":
        p = tmp / "config.json"
        p.write_text(json.dumps(dict(GOOD_CFG, num_attention_heads=6, num_key_value_heads=4)))
        return ["lower", str(p)]
    if kind == "missing_key":
        p = tmp / "config.json"
        p.write_text(json.dumps({k: v for k, v in GOOD_CFG.items() if k != "hidden_size"}))
        return ["stats", str(p)]
    if kind == "missing_file":
        return ["lower", str(tmp / "nope" / "config.json")]
    if kind == "unknown_preset":
        return ["lower", "qwen9-1t"]
    if kind == "checkpoint_dir_without_config":
        return ["lower", str(tmp)]
    if kind == "layers_out_of_range":
        return ["lower", QN, "--layers", "40:49"]
    if kind == "layers_malformed":
        return ["lower", QN, "--layers", "a:b"]
    if kind == "unknown_quant":
        return ["lower", QN, "--quant", "Q3_K_XXL"]
    if kind == "unknown_kv_type":
        return ["lower", QN, "--kv-type", "q9_0"]
    if kind == "bad_phase":
        return ["lower", QN, "--phase", "decode"]
    if kind == "bad_format":
        return ["lower", QN, "--format", "yaml"]
    if kind == "unknown_option":
        return ["lower", QN, "--colour"]
    if kind == "missing_argument":
        return ["lower"]
    if kind == "unknown_verb":
        return ["lowr", QN]
    raise AssertionError(kind)


ERRORS = ["malformed_json", "unknown_model_type", "truncated_gguf", "truncated_gguf_header", "inconsistent_heads",
          "missing_key", "missing_file", "unknown_preset", "checkpoint_dir_without_config", "layers_out_of_range",
          "layers_malformed", "unknown_quant", "unknown_kv_type", "bad_phase", "bad_format", "unknown_option",
          "missing_argument", "unknown_verb"]


@pytest.mark.parametrize("kind", ERRORS)
def test_errors_are_one_line_exit_2(capsys, tmp_path, kind):
    code, out, err = run(capsys, *_case(kind, tmp_path))
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("error: ") and "Traceback" not in err and "internal error" not in err


def test_error_messages_say_what(capsys, tmp_path):
    expect = {
        "malformed_json": "malformed JSON at line 2",
        "unknown_model_type": "unknown model_type 'gpt_bigcode'",
        "truncated_gguf": "truncated",
        "inconsistent_heads": "num_attention_heads=6 is not a multiple of num_key_value_heads=4",
        "missing_key": "lacks 'hidden_size'",
        "missing_file": "no such file",
        "layers_out_of_range": "--layers 40:49 is outside 0:48",
        "unknown_quant": "Q3_K_XXL",
        "unknown_kv_type": "q9_0",
    }
    for i, (kind, text) in enumerate(expect.items()):
        sub = tmp_path / str(i)
        sub.mkdir()
        code, _, err = run(capsys, *_case(kind, sub))
        assert code == 2 and text in err, (kind, err)


def test_gguf_model_lowers(capsys, tmp_path):
    p = tmp_path / "tiny.gguf"
    _tiny_gguf(p)
    code, out, err = run(capsys, "lower", str(p), "--phase", "tg")
    assert code == 0 and err == ""
    g = from_text(out)
    assert g.info["quant"] == "gguf" and g["blk.0.attn_q.weight"].spec.dtype.name == "f32"
    code, out, err = run(capsys, "stats", str(p), "--format", "json")
    # tied embeddings; three norms; q, k, v, o; gate, up, down
    assert code == 0 and json.loads(out)["params_total"] == 32 * 64 + 64 * 3 + 64 * 64 * 4 + 3 * 128 * 64
