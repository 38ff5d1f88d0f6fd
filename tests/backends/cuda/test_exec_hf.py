"""The executor against transformers (the oracle) on random tiny models of every architecture.

Each example saves a random transformers model with `save_pretrained`, runs a prompt of >= 7
tokens and 4 greedy decode steps through `Session`, once with the whole prompt and once with
the prompt split over two prefill calls, and compares every logit row with transformers'
forward over the same full sequence (f32: 1e-4 relative).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_checks import attention_sizes, check_against_hf
from helpers.hf_oracle import check_low_precision, hf_logits, hf_model, rel_err, save, torch_threads
from cli.main import main
from graphir.models.sources import load_source

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield



ROPES = [None, {"rope_type": "linear", "factor": 2.0},
         {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 1.0}]


@st.composite
def llama_configs(draw: st.DrawFn) -> dict:
    c = draw(attention_sizes())
    rope = draw(st.sampled_from(ROPES))
    c.update(attention_bias=draw(st.booleans()))
    if rope:
        c["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    return c


@st.composite
def moe_sizes(draw: st.DrawFn) -> dict:
    e = draw(st.integers(3, 6))
    return dict(num_experts=e, num_experts_per_tok=draw(st.integers(2, min(e, 3))),
                moe_intermediate_size=draw(st.sampled_from([7, 12])), norm_topk_prob=draw(st.booleans()))


@st.composite
def qwen3_moe_configs(draw: st.DrawFn) -> dict:
    c = {**draw(attention_sizes()), **draw(moe_sizes())}
    c["decoder_sparse_step"] = draw(st.sampled_from([1, 2]))
    c["mlp_only_layers"] = draw(st.sampled_from([[], [0]]))
    return c


@st.composite
def qwen3_next_configs(draw: st.DrawFn) -> dict:
    c = {**draw(attention_sizes(head_dims=(4, 8, 12))), **draw(moe_sizes())}
    nk = draw(st.integers(1, 2))
    c.update(num_hidden_layers=draw(st.integers(2, 4)), partial_rotary_factor=0.5, shared_expert_intermediate_size=draw(st.sampled_from([9, 16])),
             linear_num_key_heads=nk, linear_num_value_heads=nk * draw(st.integers(1, 2)),
             linear_key_head_dim=draw(st.sampled_from([4, 6])), linear_value_head_dim=draw(st.sampled_from([3, 5])),
             linear_conv_kernel_dim=draw(st.sampled_from([2, 4])),
             decoder_sparse_step=draw(st.sampled_from([1, 2])))
    n = c["num_hidden_layers"]
    interval = draw(st.sampled_from([1, 2, 3]))
    c["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    c["layer_types"][-1] = "full_attention"  # transformers' cache needs one attention layer
    return c


STRATEGIES = {"llama": llama_configs(), "qwen3": attention_sizes(), "qwen3_moe": qwen3_moe_configs(),
              "qwen3_next": qwen3_next_configs()}



def _case(arch: str):
    @SETTINGS
    @given(config=STRATEGIES[arch], prompt=st.lists(st.integers(0, 36), min_size=7, max_size=11),
           split=st.integers(1, 6), seed=st.integers(0, 3))
    def test(tmp_path_factory: pytest.TempPathFactory, config: dict, prompt: list[int], split: int, seed: int) -> None:
        check_against_hf(arch, config, tmp_path_factory.mktemp(arch), prompt, split, seed)

    test.__name__ = f"test_{arch}_matches_transformers"
    return test


test_llama_matches_transformers = _case("llama")
test_qwen3_matches_transformers = _case("qwen3")
test_qwen3_moe_matches_transformers = _case("qwen3_moe")
test_qwen3_next_matches_transformers = _case("qwen3_next")

FIXED = {
    "llama": dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8),
    "qwen3": dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=6, tie_word_embeddings=True),
    "qwen3_moe": dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=10),
    "qwen3_next": dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=10, shared_expert_intermediate_size=12, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=4, linear_value_head_dim=6,
                       linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "gpt_oss": dict(vocab_size=40, hidden_size=24, intermediate_size=10, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=3),
    "gemma3": dict(vocab_size=40, hidden_size=24, intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, sliding_window=3, query_pre_attn_scalar=12,
                   sliding_window_pattern=2, final_logit_softcapping=5.0),
}
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]


@pytest.mark.parametrize("arch", sorted(FIXED))
def test_cli_eval_matches_transformers(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = hf_model(arch, **FIXED[arch])
    ckpt = save(model, tmp_path / "ckpt")
    out = tmp_path / "logits.npy"
    rc = main(["eval", str(ckpt), "--tokens", ",".join(map(str, PROMPT)), "--decode", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    generated = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (len(PROMPT) + 4, FIXED[arch]["vocab_size"])
    ref = hf_logits(model, PROMPT + generated)
    assert rel_err(torch.from_numpy(logits), ref) < TOL
    assert generated == [int(r.argmax()) for r in ref[len(PROMPT) - 1:-1]]


def test_sharded_checkpoint(tmp_path: Path) -> None:
    model = hf_model("qwen3_next", **FIXED["qwen3_next"])
    ckpt = save(model, tmp_path / "ckpt", max_shard_size="20KB")
    assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 2
    logits, gen = greedy(Session(load_source(ckpt), None, "cpu", 16), PROMPT, 2)
    assert rel_err(logits, hf_logits(model, PROMPT + gen)) < TOL


@pytest.mark.parametrize("layout", ["gate_up", "gate_up_transposed", "separate"])
def test_fused_expert_layouts(layout: str, tmp_path: Path) -> None:
    """Fused [E,2N,H] gate_up / [E,H,N] down (as the modules hold them), transposed, or split."""
    from safetensors.torch import load_file, save_file

    model = hf_model("qwen3_moe", **FIXED["qwen3_moe"])
    ckpt = save(model, tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    E = FIXED["qwen3_moe"]["num_experts"]
    for i in range(FIXED["qwen3_moe"]["num_hidden_layers"]):
        base = f"model.layers.{i}.mlp.experts"
        g, u, d = (torch.stack([tensors.pop(f"{base}.{j}.{p}_proj.weight") for j in range(E)])
                   for p in ("gate", "up", "down"))
        if layout == "separate":
            tensors.update({f"{base}.gate_proj": g, f"{base}.up_proj": u, f"{base}.down_proj": d})
        else:
            gu, dn = torch.cat([g, u], dim=1), d  # [E,2N,H], [E,H,N]
            if layout == "gate_up_transposed":
                gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
            tensors.update({f"{base}.gate_up_proj": gu, f"{base}.down_proj": dn})
    save_file(tensors, str(ckpt / "model.safetensors"))
    logits, gen = greedy(Session(load_source(ckpt), None, "cpu", 16), PROMPT, 2)
    assert rel_err(logits, hf_logits(model, PROMPT + gen)) < TOL


@pytest.mark.parametrize("arch", sorted(FIXED))
def test_bf16_agrees_with_f32(arch: str, tmp_path: Path) -> None:
    """bf16 / f16 runs stay as close to the f32 run as transformers' own bf16 / f16 runs do
    (a model-dependent tolerance measured on the oracle, with a floor of 3%)."""
    model = hf_model(arch, **FIXED[arch])
    check_low_precision(model, save(model, tmp_path / "ckpt"), PROMPT)


def test_hf_config_json_roundtrip(tmp_path: Path) -> None:
    """The saved config (transformers 5 spelling, e.g. num_local_experts) gives the same model."""
    ckpt = save(hf_model("qwen3_moe", **FIXED["qwen3_moe"]), tmp_path / "ckpt")
    cfg = load_source(ckpt).cfg
    raw = json.loads((ckpt / "config.json").read_text())
    assert cfg.n_expert == FIXED["qwen3_moe"]["num_experts"] and cfg.is_moe_layer(0), raw.keys()
