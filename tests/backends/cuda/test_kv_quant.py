"""Quantised KV caches (backends/cuda/reference/kv_quant.py): the quantisers against the `gguf`
package (ggml's reference, bit for bit), and whole models with a q8_0 / q4_0 cache against
transformers whose cache stores the same ggml round trip of every K and V row.

The oracle is a transformers `DynamicCache` that rounds what it stores through
gguf.quants.quantize / dequantize: attention then sees exactly the values a ggml cache holds,
so graphir's logits must equal it within f32 rounding, while differing from a float cache by
the quantisation error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cuda.reference import kv_quant
from backends.cuda.runtime.session import Session, greedy
from graphir.errors import GraphirError
from graphir.models import from_hf_dict
from graphir.models.sources import load_source
from helpers.hf_oracle import hf_model, rel_err, save

QT = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def _gguf_round_trip(x: torch.Tensor, name: str) -> torch.Tensor:
    n = x.detach().to(torch.float32).numpy().reshape(-1, x.shape[-1])
    back = quants.dequantize(quants.quantize(n, QT[name]), QT[name])
    return torch.from_numpy(back.reshape(x.shape)).to(x.dtype)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(QT)), rows=st.integers(1, 6), blocks=st.integers(1, 4),
       scale=st.sampled_from([1e-3, 1.0, 40.0]), zeros=st.booleans(), halves=st.booleans(), seed=st.integers(0, 99))
def test_quantizers_are_ggml_bit_for_bit(name: str, rows: int, blocks: int, scale: float, zeros: bool,
                                         halves: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, 32 * blocks, generator=g) * scale
    if zeros:
        x[0, 0, :32] = 0  # an all-zero block: scale 0, not a division by it
    if halves:  # values at x.5 steps of the scale: roundf's halves away from zero, not to even
        x[-1, -1, :32] = torch.arange(-16, 16, dtype=torch.float32) * 0.5 + 0.5
        x[-1, -1, 0] = 127.0
    raw = kv_quant.quantize(x, name)
    want = quants.quantize(x.numpy().reshape(-1, x.shape[-1]), QT[name]).reshape(rows, 3, -1)
    assert raw.dtype == torch.uint8 and raw.shape == (rows, 3, kv_quant.stored_shape(name, (32 * blocks,))[0])
    assert np.array_equal(raw.numpy(), want)
    back = kv_quant.dequantize(raw, name, torch.float32)
    assert torch.equal(back, _gguf_round_trip(x, name))


def _hf_round_trip_logits(model, ids: list[int], name: str) -> torch.Tensor:
    from transformers.cache_utils import DynamicCache

    class GgmlCache(DynamicCache):  # stores every K/V row as ggml's cache would hold it
        def update(self, k, v, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
            return super().update(_gguf_round_trip(k, name), _gguf_round_trip(v, name), layer_idx, *args, **kwargs)

    import inspect

    # the cache argument's name changes across transformers releases (past_key_values -> cache)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True, **{key: GgmlCache(config=model.config)})
    return out.logits[0].to(torch.float32)


@pytest.mark.parametrize("name", sorted(QT))
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_quantised_cache_equals_transformers_with_ggml_rows(tmp_path: Path, arch: str, name: str) -> None:
    """Prefill and greedy decode, unplaced, then as two prefills and a decode; the same numbers."""
    model = hf_model(arch, seed=0, **TINY)
    src = load_source(save(model, tmp_path / arch))
    whole, gen = greedy(Session(src, None, "cpu", 32, kv_type=name), PROMPT, 4)
    ref = _hf_round_trip_logits(model, PROMPT + gen, name)
    assert rel_err(whole, ref) < 1e-5
    with torch.no_grad():
        plain = model(torch.tensor([PROMPT + gen])).logits[0].to(torch.float32)
    assert rel_err(whole, plain) > 1e-4  # the cache really is quantised
    s = Session(src, None, "cpu", 32, kv_type=name)
    parts = torch.cat([s.prefill(PROMPT[:3]), s.prefill(PROMPT[3:]), s.decode(gen)])
    assert rel_err(parts[:len(PROMPT) + len(gen)], ref[:len(PROMPT) + len(gen)]) < 1e-5
    assert s.buffers and all(b.dtype == torch.uint8 for b in s.buffers.values())


@pytest.mark.parametrize("split", ["layer", "graph"])
def test_quantised_cache_under_placement(tmp_path: Path, split: str) -> None:
    """Layer split and graph split (KV heads over two devices, uneven): blocks are per head, so
    each device's slice of the cache holds the same bytes and the logits stay those of one device."""
    from cli.run import make_transform

    model = hf_model("qwen3", seed=1, **TINY)
    src = load_source(save(model, tmp_path / "m"))
    devs = ("cpu:0", "cpu:1")
    one, gen = greedy(Session(src, None, "cpu", 32, kv_type="q8_0"), PROMPT, 3)
    t = make_transform(src.cfg, devs, split, "3,1" if split == "layer" else None)
    placed, gen2 = greedy(Session(src, None, devs, 32, kv_type="q8_0", transform=t), PROMPT, 3)
    assert gen2 == gen and rel_err(placed, one) < 1e-5


def test_unexecutable_cache_types_are_refused_by_name(tmp_path: Path) -> None:
    src = load_source(save(hf_model("qwen3", seed=0, **TINY), tmp_path / "m"))
    with pytest.raises(GraphirError, match="KV cache type q6_0 is not executable.*q8_0, q4_0"):
        Session(src, None, "cpu", 32, kv_type="q6_0")
    small = load_source(save(hf_model("qwen3", seed=0, **dict(TINY, head_dim=16)), tmp_path / "s"))
    with pytest.raises(GraphirError, match="multiple of 32.*16"):
        Session(small, None, "cpu", 32, kv_type="q8_0")


def test_latent_cache_is_refused() -> None:
    """Multi-head latent attention reads its cache with matmuls, not attention: not executable."""
    cfg = from_hf_dict(dict(model_type="deepseek_v3", vocab_size=40, hidden_size=32, intermediate_size=30,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16, q_lora_rank=12, kv_lora_rank=28,
                            qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
                            n_group=1, topk_group=1))
    with pytest.raises(GraphirError, match="q8_0 is executable for attention's K/V caches only"):
        Session(cfg, None, "cpu", 32, kv_type="q8_0")


def test_cli_eval_takes_a_quantised_cache(tmp_path: Path, capsys) -> None:
    from cli.main import main

    path = save(hf_model("qwen3", seed=0, **TINY), tmp_path / "m")
    assert main(["eval", str(path), "--tokens", "3,1,4,1,5", "--decode", "2", "--kv-type", "q4_0"]) == 0
    out = capsys.readouterr()
    assert "KV q4_0" in out.err and len(out.out.strip().split(",")) == 2
    assert main(["eval", str(path), "--tokens", "3,1", "--kv-type", "q5_1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: KV cache type q5_1 is not executable: the executor keeps caches in f32, f16, bf16, q8_0, q4_0"]


@pytest.mark.parametrize("name", sorted(QT))
def test_bucket_decode_step_writes_and_reads_blocks(tmp_path: Path, name: str) -> None:
    """The decode step's route (fixed bucket, device-side position; run eagerly here, captured
    on a GPU): kv_append quantises into the buffer at the position, attention masks past it,
    and the rows equal the session's own decode."""
    from backends.cuda.capture.decode_step import DecodeStep
    from backends.cuda.rules.rule_table import CUDA_KERNELS

    src = load_source(save(hf_model("qwen3", seed=2, **TINY), tmp_path / "m"))
    s = Session(src, None, "cpu", 64, kv_type=name, kernels=CUDA_KERNELS)
    s.prefill(PROMPT)
    want = s.decode([7, 8]).float()
    s.reset()
    s.prefill(PROMPT)
    step = DecodeStep(s, 32, capture=False)
    rows = []
    for t in (7, 8):
        step.step(t)
        rows.append(step.logits.float().clone())
    assert rel_err(torch.cat(rows), want) < 1e-5
