"""DeepSeek-V3 (deepseek_v3; Kimi-K2 is the same family): multi-head latent attention, absorbed.

The oracle is transformers with random weights (selection bias drawn too): graphir's logits
equal transformers' within 1e-4 relative in f32, prefill and greedy decode, with and without
q_lora, interleaved or plain rotary rows, YaRN with mscale; unplaced, layer split and graph
split (heads split, latent cache replicated, as ik_llama.cpp) over 2-4 logical CPU devices.
The KV cache is the latent row, kv_lora_rank + qk_rope_head_dim per token and layer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import hf_checkpoint_numel, hf_logits, hf_model, rel_err, save
from cli.main import main
from helpers.cli_oracle import cli_eval
from graphir.models import BuildOptions, build, from_hf_dict
from graphir.models.config import ConfigError
from graphir.models.sources import load_preset, load_source
from graphir.ops import Op
from graphir.stats import graph_stats

TOL = 1e-4
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]
NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}
FIXED = dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             q_lora_rank=12, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5,
             first_k_dense_replace=1, n_group=4, topk_group=2, max_position_embeddings=64, **NO_IDS)


@st.composite
def configs(draw: st.DrawFn) -> dict:
    groups = draw(st.sampled_from([1, 2]))
    E = groups * draw(st.integers(2, 3))
    return dict(vocab_size=37, hidden_size=16, intermediate_size=20, num_hidden_layers=draw(st.integers(1, 3)),
                num_attention_heads=(h := draw(st.integers(1, 3))), num_key_value_heads=h,
                n_routed_experts=E, num_experts_per_tok=draw(st.integers(1, 2)), moe_intermediate_size=8,
                n_shared_experts=draw(st.integers(1, 2)), n_group=groups, topk_group=draw(st.integers(1, groups)),
                first_k_dense_replace=draw(st.integers(0, 1)), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                q_lora_rank=draw(st.sampled_from([None, 8])), kv_lora_rank=draw(st.sampled_from([6, 10])),
                qk_rope_head_dim=draw(st.sampled_from([2, 4])), qk_nope_head_dim=draw(st.sampled_from([3, 6])),
                v_head_dim=draw(st.sampled_from([4, 5])), rope_interleave=draw(st.booleans()),
                norm_topk_prob=draw(st.booleans()), tie_word_embeddings=draw(st.booleans()),
                rope_parameters=draw(st.sampled_from([{"rope_type": "default", "rope_theta": 10000.0}, YARN])),
                max_position_embeddings=64, **NO_IDS)


def _hf(config: dict, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_model("deepseek_v3", seed=seed, **config)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=configs(), split=st.integers(1, 6), seed=st.integers(0, 3))
def test_matches_transformers(tmp_path_factory: pytest.TempPathFactory, config: dict, split: int, seed: int) -> None:
    model = _hf(config, seed)
    source = load_source(save(model, tmp_path_factory.mktemp("ds")))
    whole, generated = greedy(Session(source, None, "cpu", 32), PROMPT, 4)
    ref = hf_logits(model, PROMPT + generated)
    assert rel_err(whole, ref) < TOL, config
    s = Session(source, None, "cpu", 32)
    parts = [s.prefill(PROMPT[:split]), s.prefill(PROMPT[split:]), s.decode(generated)]
    assert rel_err(torch.cat(parts), ref) < TOL, (split, config)


@pytest.mark.parametrize("devices,split,ts", [
    ("cpu,cpu", "layer", "3,1"), ("cpu,cpu,cpu", "layer", "1,2,1"), ("cpu,cpu", "graph", "2,1"),
    ("cpu,cpu,cpu", "graph", "3,2,1"), ("cpu,cpu,cpu,cpu", "graph", "1,1,2,3"),
])
@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_cli_eval_placed_matches_transformers(devices: str, split: str, ts: str, rope: str, tmp_path: Path) -> None:
    model = _hf(dict(FIXED, rope_parameters=YARN) if rope == "yarn" else FIXED, seed=1)
    err, generated, greedy_ref = cli_eval(model, save(model, tmp_path / "ckpt"), PROMPT, 4,
                                          "--devices", devices, "--split", split, "--ts", ts)
    assert err < TOL and generated == greedy_ref


def test_graph_split_heads_and_replicated_latent_cache() -> None:
    """ik_llama.cpp's -sm graph for MLA: wq_a, wkv_a_mqa and their norms whole on every device,
    each device writes its own copy of the latent cache; wq_b, wk_b, wv_b and wo by heads."""
    passes = pytest.importorskip("passes")
    cfg = from_hf_dict({"model_type": "deepseek_v3", **FIXED})
    g = passes.run_pipeline(build(cfg, BuildOptions(phase="tg")), ("place_graph",),
                            passes.PassContext(cfg=cfg, devices=("cpu:0", "cpu:1"), ts=(1.0, 1.0))).graph
    r, dr, nh = cfg.kv_lora_rank, cfg.head_dim, cfg.n_head
    for j in range(2):
        assert g[f"blk.0.cache_kv#{j}"].spec.shape == ("KV", 1, r + dr)  # a whole copy each
        assert g[f"blk.0.attn_kv_a_mqa.weight#{j}"].spec.shape == (r + dr, cfg.hidden_size)
        assert g[f"blk.0.attn_k_b.weight#{j}"].spec.shape == (nh // 2, r, cfg.qk_nope_head_dim)
        assert g[f"blk.0.attn_output.weight#{j}"].spec.shape == (cfg.hidden_size, nh // 2 * cfg.v_head_dim)
    keys = {n.attr["key"] for n in g.by_op(Op.OUTPUT) if "cache_kv" in n.name}
    assert keys >= {"blk.0.cache_kv#0", "blk.0.cache_kv#1"}


def test_kv_cache_is_the_latent_row() -> None:
    """The cost model and memory see kv_lora_rank + qk_rope_head_dim per token and layer (576
    for DeepSeek-V3: 70 KB per token in f16 over 61 layers), not heads x (k + v)."""
    cfg = load_preset("deepseek-v3")
    g = build(cfg, BuildOptions(phase="tg", kv_type="f16"))
    caches = [n for n in g.by_op(Op.STATE_IN)]
    assert len(caches) == cfg.n_layer and all(n.spec.shape == ("KV", 1, 576) for n in caches)
    assert sum(n.spec.nbytes_at({"KV": 1}) for n in caches) == 61 * 576 * 2


@settings(max_examples=15, deadline=None)
@given(config=configs())
def test_params_match_transformers(config: dict) -> None:
    d = {"model_type": "deepseek_v3", **config}
    assert graph_stats(build(from_hf_dict(d), BuildOptions(phase="tg"))).params_total == hf_checkpoint_numel(d)


def test_presets_active_parameters_are_the_published_ones() -> None:
    """DeepSeek-V3: 671 B parameters, 37 B active per token (8 of 256 experts); Kimi-K2: ~1 T, 32 B."""
    ds = graph_stats(build(load_preset("deepseek-v3"), BuildOptions(phase="tg")))
    kimi = graph_stats(build(load_preset("kimi-k2"), BuildOptions(phase="tg")))
    assert round(ds.params_total / 1e9) == 671 and round(ds.params_active / 1e9) in (37, 38)
    assert round(kimi.params_total / 1e12, 2) == 1.03 and round(kimi.params_active / 1e9) == 33


def test_kimi_k2_config_is_this_family() -> None:
    cfg = from_hf_dict({**FIXED, "model_type": "kimi_k2"})
    assert cfg.arch == "deepseek_v3" and cfg.kv_lora_rank == 16


@pytest.mark.parametrize("change,msg", [
    ({"kv_lora_rank": 0}, "kv_lora_rank=0"),
    ({"attention_bias": True}, "attention_bias"),
    ({"n_group": 3}, "n_group=3"),
])
def test_bad_configs_are_one_line_errors(change: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        from_hf_dict({"model_type": "deepseek_v3", **FIXED, **change})


@pytest.mark.parametrize("hw", ["2x3090", "4x3090", "2xH200"])
@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1", "kimi-k2"])
def test_predict_every_preset_on_every_rig(name: str, hw: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Too large for every rig here even in Q4_K_M: the clean does-not-fit error, then
    --allow-overflow prices both split modes."""
    out = tmp_path / "p.csv"
    args = ["predict", name, "--hw", hw, "--ctx", "4096", "--ubatch", "512", "--tg", "16", "--split", "layer,graph",
            "--quant", "Q4_K_M", "--format", "csv", "-o", str(out)]
    capsys.readouterr()
    assert main(args) == 2 and "does not fit" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--allow-overflow"]) == 0
    text = out.read_text()
    assert "layer" in text and "graph" in text


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_gguf_matches_safetensors(rope: str, tmp_path: Path) -> None:
    """A deepseek2 GGUF as llama.cpp lays it out (interleaved rotary rows as in the checkpoint,
    attn_k_b / attn_v_b per head, MLA and YaRN keys) loads to the same config and logits."""
    from backends.cuda.weights.hf_checkpoint import HFCheckpoint
    from backends.cuda.weights.mla_weights import interleave
    from graphir.models import gguf_writer
    from graphir.models.weights import reference_weights

    # GGUF keeps YaRN's mscale_all_dim only (llama.cpp takes mscale equal to it) and no betas
    yarn = {k: v for k, v in YARN.items() if not k.startswith("beta")} | {"mscale": 1.0}
    model = _hf(dict(FIXED, rope_parameters=yarn) if rope == "yarn" else FIXED, seed=2)
    src = load_source(save(model, tmp_path / "ckpt"))
    ref, gen = greedy(Session(src, None, "cpu", 16), PROMPT, 3)
    ckpt, cfg = HFCheckpoint(src.path, src.cfg), src.cfg
    tensors = {}
    for name, info in reference_weights(cfg).items():
        t = ckpt.get(info).to(torch.float32)
        kind = {"attn_q_b.weight": "mla_q", "attn_kv_a_mqa.weight": "mla_kv_a"}.get(name.split(".", 2)[-1])
        tensors[name] = (interleave(kind, t, cfg) if kind else t).numpy()
    path = tmp_path / "ds.gguf"
    gguf_writer.write_specs(path, cfg, gguf_writer.tensor_specs(cfg), types={n: "f32" for n in tensors}, arrays=tensors)
    g_src = load_source(path)
    ignored = {"name", "max_position_embeddings", "torch_dtype"}
    assert g_src.cfg.model_dump(exclude=ignored) == cfg.model_dump(exclude=ignored)
    s = Session(g_src, None, "cpu", 16)
    assert rel_err(torch.cat([s.prefill(PROMPT), s.decode(gen)]), ref) < 1e-5



@pytest.mark.parametrize("placement", [(), ("--devices", "cpu,cpu", "--split", "graph", "--ts", "2,1"),
                                       ("--devices", "cpu,cpu,cpu", "--split", "layer", "--ts", "1,2,1")])
def test_default_passes_keep_the_logits(placement: tuple[str, ...], tmp_path: Path) -> None:
    """The CUDA backend's default passes (merges, contiguous heads: q_b's nope / rope pieces
    become views) after each placement."""
    from cli.run import DEFAULT_PASSES

    model = _hf(FIXED, seed=1)
    err, generated, greedy_ref = cli_eval(model, save(model, tmp_path / "ckpt"), PROMPT, 4, *placement,
                                          "--passes", DEFAULT_PASSES)
    assert err < TOL and generated == greedy_ref
