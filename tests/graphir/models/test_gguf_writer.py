"""graphir's GGUF writer: files that graphir's reader and the gguf package's own reader (an
independent parser) both read back as written; random quant blocks that dequantise (with the
gguf package) to finite weights the size of N(0, 0.02); deterministic per seed and tensor.
The logits oracle (written f32/f16/Q8_0 weights against the same weights from safetensors)
is tests/backends/cuda/test_exec_gguf.py, which writes its files with this writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

from cli.main import main
from graphir.models import from_hf_dict
from graphir.models.gguf_header import read_header
from graphir.models.gguf_source import tensor_shapes
from graphir.models.gguf_writer import TYPES, file_size, tensor_specs, write_gguf
from graphir.models.sources import load_source, load_preset

COMMON = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=4096)
CASES = {
    "llama": dict(COMMON, model_type="llama", tie_word_embeddings=False),
    "qwen3": dict(COMMON, model_type="qwen3", tie_word_embeddings=True),
    "qwen3_moe": dict(COMMON, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=256, norm_topk_prob=True),
    "qwen3_next": dict(COMMON, model_type="qwen3_next", partial_rotary_factor=0.25, full_attention_interval=4,
                       num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                       shared_expert_intermediate_size=256, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=32, linear_value_head_dim=64, linear_conv_kernel_dim=4),
}
IGNORED = {"name", "torch_dtype"}
# ik_llama.cpp's iq4k_values (ggml-common.h): the IQ4_NL table and the same shifted by +4
IQ4K = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                 -123, -100, -79, -61, -45, -31, -18, -6, 5, 17, 29, 42, 57, 73, 93, 117], np.float32)


def _cfg(arch: str):
    return from_hf_dict(CASES[arch], name=arch)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_round_trip(arch: str, tmp_path: Path) -> None:
    cfg = _cfg(arch)
    p = tmp_path / "m.gguf"
    types = write_gguf(p, cfg, wtype="q8_0", seed=3)
    src = load_source(p)
    assert src.cfg.model_dump(exclude=IGNORED) == cfg.model_dump(exclude=IGNORED)
    specs = {s.name: s.shape for s in tensor_specs(cfg)}
    assert tensor_shapes(p) == specs
    assert {n: dt.name for n, dt in src.tensor_types} == types
    r = GGUFReader(str(p))
    assert r.fields["tokenizer.ggml.model"].contents() == "none"
    assert r.fields[f"{r.fields['general.architecture'].contents()}.vocab_size"].contents() == cfg.vocab_size
    for t in r.tensors:  # the independent parser agrees on shape, type and data size
        assert tuple(reversed(t.shape.tolist())) == specs[t.name]
        assert t.tensor_type.name.lower() == types[t.name]
    assert p.stat().st_size >= file_size(cfg, "q8_0")
    vec = [n for n, s in specs.items() if len(s) == 1]
    assert all(types[n] == "f32" for n in vec) and "q8_0" in types.values()


@pytest.mark.parametrize("wtype", [t for t in TYPES if t != "iq4_ks"])
def test_blocks_dequantise_to_small_finite_weights(wtype: str, tmp_path: Path) -> None:
    p = tmp_path / f"{wtype}.gguf"
    types = write_gguf(p, _cfg("qwen3_next"), wtype=wtype, seed=0)
    assert wtype in types.values()
    for t in GGUFReader(str(p)).tensors:
        w = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        assert np.isfinite(w).all(), t.name
        if t.name.endswith("ssm_a"):
            assert (w < 0).all()
        elif t.name.endswith("norm.weight"):
            assert 0.5 < w.mean() < 1.5
        elif w.ndim >= 2 and types[t.name] == wtype:
            assert np.abs(w).max() < 1 and 0.01 < w.std() < 0.04 and abs(w.mean()) < 0.005, (t.name, w.std())


def test_iq4_ks_rows(tmp_path: Path) -> None:
    # ik_llama.cpp's dequantize_row_iq4_ks, transcribed: f32 row scale, blocks of 8 scales + 128 qs
    p = tmp_path / "ks.gguf"
    types = write_gguf(p, _cfg("qwen3"), wtype="iq4_ks", seed=0)
    head = read_header(p)  # the gguf package does not know ik_llama.cpp's type ids
    t = next(x for x in head.tensors if x.name == "blk.0.ffn_up.weight")
    name, (n, rows), offset, start = t.name, t.ne, t.offset, head.data_start
    assert t.dtype.ggml == 144 and t.dtype.name == "iq4_ks" and types[name] == "iq4_ks" and (n, rows) == (256, 512)
    row = 4 + n // 256 * 136
    raw = np.frombuffer(p.read_bytes(), np.uint8, rows * row, start + offset).reshape(rows, row)
    d = raw[:, :4].copy().view("<f4")[:, 0]
    blk = raw[:, 4:].reshape(rows, n // 256, 136)
    sc, qs = blk[..., :8].astype(np.int32), blk[..., 8:].reshape(rows, n // 256, 8, 16)
    dl = d[:, None, None] * ((sc & 254) - 127)
    shift = ((sc & 1) << 4)[..., None]
    lo, hi = IQ4K[(qs & 15) + shift], IQ4K[(qs >> 4) + shift]
    w = dl[..., None] * np.concatenate([lo, hi], axis=-1)
    assert np.isfinite(w).all() and np.abs(w).max() < 1 and 0.01 < w.std() < 0.04


def test_deterministic_and_layers_are_a_prefix(tmp_path: Path) -> None:
    cfg = _cfg("qwen3_next")
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write_gguf(a, cfg, wtype="iq4_xs", seed=1)
    write_gguf(b, cfg, wtype="iq4_xs", seed=1)
    assert a.read_bytes() == b.read_bytes()
    write_gguf(c, cfg, wtype="iq4_xs", seed=2)
    assert a.read_bytes() != c.read_bytes()
    short = tmp_path / "short.gguf"
    write_gguf(short, cfg.with_layers(2), wtype="iq4_xs", seed=1)
    full = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(str(a)).tensors}
    part = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(str(short)).tensors}
    assert load_source(short).cfg.n_layer == 2 and set(part) < set(full)
    assert all(full[k] == v for k, v in part.items())  # same tensor, same bytes


def test_large_float_tensors_stream_in_chunks(tmp_path: Path) -> None:
    # a vocab big enough that token_embd passes the pool of exact samples; still finite, N(0, 0.02)
    cfg = from_hf_dict(dict(CASES["qwen3"], vocab_size=20000, num_hidden_layers=1), name="v")
    p = tmp_path / "v.gguf"
    write_gguf(p, cfg, wtype="bf16")
    t = next(t for t in GGUFReader(str(p)).tensors if t.name == "token_embd.weight")
    w = dequantize(np.asarray(t.data), t.tensor_type)
    assert w.shape == (20000, 256) and np.isfinite(w).all() and 0.015 < w.std() < 0.025


def test_cli_writes_first_layers_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.gguf"
    cfg = tmp_path / "config.json"
    import json
    cfg.write_text(json.dumps(CASES["qwen3_next"]))
    assert main(["gguf", str(cfg), "-o", str(out), "--type", "q4_0", "--layers", "0:2"]) == 0
    assert load_source(out).cfg.n_layer == 2
    capsys.readouterr()
    for bad in (["--type", "q9_9"], ["--layers", "1:3"], ["-o", str(tmp_path / "no" / "x.gguf")]):
        args = ["gguf", str(cfg), "-o", str(tmp_path / "y.gguf")] + bad
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "y.gguf").exists()


def test_random_gguf_evaluates_to_finite_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    p = tmp_path / "q.gguf"
    write_gguf(p, _cfg("qwen3_next"), wtype="q4_0")
    out = tmp_path / "l.npy"
    assert main(["eval", str(p), "--tokens", "1,2,3,4", "--out", str(out)]) == 0, capsys.readouterr().err
    logits = np.load(out)
    assert np.isfinite(logits).all() and logits.std() > 0


def test_preset_sizes() -> None:
    # what the bench writes: Qwen3-8B f16 is 16.4 GB, its Q4_0 about 4.7 GB
    cfg = load_preset("qwen3-8b")
    assert 16.0e9 < file_size(cfg, "f16") < 16.8e9
    assert 4.4e9 < file_size(cfg, "q4_0") < 5.0e9
