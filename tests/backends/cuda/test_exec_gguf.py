"""GGUF weights: a file written with the gguf package (F32, F16 and Q8_0 tensors, laid out as
llama.cpp's converter does) runs and matches the same weights read from safetensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backends.cuda.weights.gguf_weights import GGUFWeights, permute_rope
from backends.cuda.weights.hf_checkpoint import HFCheckpoint
from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import hf_model, rel_err, save, torch_threads
from backends.cuda.weights.sources import reference_weights
from cli.main import main
from graphir.models import ModelConfig
from graphir.models import gguf_writer
from graphir.models.sources import load_source

gguf = pytest.importorskip("gguf")
try:
    from graphir.models.gguf_source import read_gguf  # noqa: F401  (the metadata reader)
except ImportError:  # pragma: no cover - written by a colleague
    pytest.skip("graphir.models.gguf_source.read_gguf is not available", allow_module_level=True)

Q = gguf.GGMLQuantizationType
COMMON = dict(vocab_size=48, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6)
CASES = {
    "llama": dict(COMMON),
    "qwen3_moe": dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen3_next": dict(COMMON, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                       layer_types=["linear_attention", "full_attention"]),
}
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
IGNORED = {"name", "max_position_embeddings", "torch_dtype"}  # what GGUF metadata does not carry


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def write_gguf(path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], quant: bool) -> Path:
    """The given weights through graphir's GGUF writer: f32, or (quant) f16 and Q8_0 blocks."""
    arrays: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for i, (name, t) in enumerate(tensors.items()):
        a = t.to(torch.float32).numpy()
        if a.ndim == 1 or not quant or "ffn_gate_inp" in name:  # llama.cpp keeps routers in f32
            arrays[name], types[name] = a, "f32"
        elif a.shape[-1] % 32 == 0 and i % 2:
            arrays[name], types[name] = gguf.quants.quantize(a, Q.Q8_0), "q8_0"  # byte rows
        else:
            arrays[name], types[name] = a, "f16"
    specs = [s for s in gguf_writer.tensor_specs(cfg) if s.name in arrays]  # a subset: a file lacking a tensor
    gguf_writer.write_specs(path, cfg, specs, types=types, arrays=arrays)
    return path


def llama_cpp_layout(cfg: ModelConfig, ckpt: Path) -> dict[str, torch.Tensor]:
    """Graph-named tensors as llama.cpp's converter stores them: llama Q/K rows permuted for
    interleaved RoPE, Qwen3-Next's zero-centred norms with the 1 added."""
    ref = reference_weights(cfg)
    src = HFCheckpoint(ckpt, cfg)
    out = {}
    for name, info in ref.items():
        t = src.get(info).to(torch.float32)
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_rope(t, cfg.n_head if "attn_q" in name else cfg.n_kv_head)
        if cfg.arch == "qwen3_next" and info.norm_offset == 1.0:
            t = t + 1.0
        out[name] = t
    return out


@pytest.mark.parametrize("arch", sorted(CASES))
def test_gguf_matches_safetensors(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # seed 1: with seed 0 one qwen3_moe token's top-k experts are a near tie that Q8_0 rounding
    # flips (a discrete change of routing, not an error of the loader)
    ckpt = save(hf_model(arch, seed=1, **CASES[arch]), tmp_path / "ckpt")
    st = load_source(ckpt)
    ref, gen = greedy(Session(st, None, "cpu", 16), PROMPT, 3)
    tensors = llama_cpp_layout(st.cfg, ckpt)
    exact = load_source(write_gguf(tmp_path / "f32.gguf", st.cfg, tensors, quant=False))
    assert exact.kind == "gguf"
    assert exact.cfg.model_dump(exclude=IGNORED) == st.cfg.model_dump(exclude=IGNORED)
    s = Session(exact, None, "cpu", 16)
    assert rel_err(torch.cat([s.prefill(PROMPT), s.decode(gen)]), ref) < 1e-5
    quant = write_gguf(tmp_path / "q.gguf", st.cfg, tensors, quant=True)
    qsrc = load_source(quant)
    assert {"f32", "f16", "q8_0"} <= {dt.name for _, dt in qsrc.tensor_types}
    gw, ref_w = GGUFWeights(quant, qsrc.cfg), reference_weights(st.cfg)
    for name, t in tensors.items():  # every dequantised tensor within its type's rounding
        back = gw.get(ref_w[name])
        if st.cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            back = permute_rope(back, st.cfg.n_head if "attn_q" in name else st.cfg.n_kv_head)
        if st.cfg.arch == "qwen3_next" and ref_w[name].norm_offset == 1.0:
            back = back + 1.0
        assert rel_err(back, t) < 1 / 100, name
    capsys.readouterr()
    out = tmp_path / "logits.npy"
    rc = main(["eval", str(quant), "--tokens", ",".join(map(str, PROMPT)), "--decode", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    got = torch.from_numpy(np.load(out))
    assert got.shape == ref.shape and rel_err(got, ref) < 0.03  # Q8_0 / F16 rounding of the weights


def test_gguf_missing_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = save(hf_model("llama", **CASES["llama"]), tmp_path / "ckpt")
    cfg = load_source(ckpt).cfg
    tensors = llama_cpp_layout(cfg, ckpt)
    del tensors["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "bad.gguf", cfg, tensors, quant=False)
    capsys.readouterr()
    assert main(["eval", str(path), "--tokens", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blk.1.ffn_up.weight" in err
