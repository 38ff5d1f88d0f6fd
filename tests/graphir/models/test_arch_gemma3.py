"""Gemma 3 (text) against transformers (the oracle): parameter counts, logits of random
checkpoints written by `save_pretrained` (unplaced, layer split, and graph split, which for
this family is layer split as in ik_llama.cpp), the multimodal wrapper's config, a GGUF in
llama.cpp's layout (norms stored with the 1 added), node counts and predictions.

Prompts are longer than the sliding window, and the local and global layers use different
RoPE bases, so a layer taking the other kind's window or frequencies shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import check_logits, hf_logits, hf_model, hf_params, rel_err, save
from helpers.whole_layers import RIGS, SPLITS, check_cli_graph_split, check_predict, check_split
from graphir.models import BuildOptions, build, from_hf_dict
from graphir.models.config import ConfigError
from graphir.models.sources import load_preset, load_source
from graphir.ops import Op
from graphir.stats import graph_stats

TOL = 1e-4
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
TINY = dict(vocab_size=40, hidden_size=24, intermediate_size=20, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=3, query_pre_attn_scalar=12, sliding_window_pattern=2,
            rope_parameters=ROPE)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]


@st.composite
def configs(draw: st.DrawFn) -> dict:
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    full = {"rope_type": "default", "rope_theta": 1e6}
    if draw(st.booleans()):
        full = {"rope_type": "linear", "factor": draw(st.sampled_from([2.0, 8.0])), "rope_theta": 1e6}
    # transformers' Gemma3TextConfig insists on hidden % heads == 0 (head_dim is its own)
    return dict(vocab_size=draw(st.sampled_from([37, 50])), hidden_size=heads * draw(st.sampled_from([4, 6])),
                intermediate_size=draw(st.sampled_from([12, 20])), num_hidden_layers=n,
                num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=draw(st.sampled_from([4, 8])), sliding_window=draw(st.integers(1, 6)),
                query_pre_attn_scalar=draw(st.sampled_from([8, 12, 168])),
                final_logit_softcapping=draw(st.sampled_from([None, 2.0])),
                layer_types=draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=n,
                                          max_size=n)),
                rope_parameters={"full_attention": full,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": draw(st.sampled_from([1e4, 10.0]))}},
                tie_word_embeddings=draw(st.booleans()))


@SETTINGS
@given(d=configs())
def test_params_match_transformers(d: dict) -> None:
    d = dict(d, model_type="gemma3_text")
    assert graph_stats(build(from_hf_dict(d), BuildOptions(phase="tg"))).params_total == hf_params(d)


def test_preset_and_its_multimodal_wrapper() -> None:
    """gemma-3-27b: 27.0 B parameters in the text model; the published config.json (the
    Gemma3ForConditionalGeneration wrapper, decoder under text_config) reads the same."""
    cfg = load_preset("gemma-3-27b")
    assert graph_stats(build(cfg, BuildOptions(phase="tg"))).params_total == 27_009_346_304
    wrapper = {"model_type": "gemma3", "torch_dtype": "bfloat16", "vision_config": {"model_type": "siglip_vision_model"},
               "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                               "model_type": "gemma3_text", "num_attention_heads": 32, "num_hidden_layers": 62,
                               "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
                               "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
    assert from_hf_dict(wrapper, name=cfg.name) == cfg
    assert cfg.layer_types.count("full_attention") == 10 and cfg.window(0) == 1024 and cfg.window(5) is None
    g = build(cfg.with_layers(6), BuildOptions(phase="tg"))
    ropes = {n.name: n.attr["theta"] for n in g.by_op(Op.ROPE)}
    assert ropes["blk.0.q_rope"] == 10000.0 and ropes["blk.5.q_rope"] == 1e6
    assert "scaling" not in g["blk.0.q_rope"].attr and g["blk.5.q_rope"].attr["factor"] == 8.0
    assert g["blk.0.kqv"].attr["scale"] == 168 ** -0.5 and g["inp_embd"].attr["scale"] == 5376 ** 0.5


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="attn_logit_softcapping"):
        from_hf_dict(dict(TINY, model_type="gemma3_text", attn_logit_softcapping=50.0))
    with pytest.raises(ConfigError, match="hidden_activation"):
        from_hf_dict(dict(TINY, model_type="gemma3_text", hidden_activation="silu"))
    with pytest.raises(ConfigError, match="unknown layer type"):
        from_hf_dict(dict(TINY, model_type="gemma3_text", layer_types=["linear_attention"] * 4))
    with pytest.raises(ConfigError, match="not a multiple of num_attention_heads"):
        from_hf_dict(dict(TINY, model_type="gemma3_text", num_attention_heads=5, num_key_value_heads=1))


@SETTINGS
@given(config=configs(), prompt=st.lists(st.integers(0, 36), min_size=7, max_size=11), split=st.integers(1, 6),
       seed=st.integers(0, 3))
def test_matches_transformers(tmp_path_factory: pytest.TempPathFactory, config: dict, prompt: list[int],
                              split: int, seed: int) -> None:
    check_logits("gemma3", config, tmp_path_factory.mktemp("gemma3"), prompt, split, seed)


@pytest.mark.parametrize("mode,n,ts", SPLITS)
def test_split_matches_transformers(mode: str, n: int, ts: str, tmp_path: Path) -> None:
    check_split("gemma3", TINY, PROMPT, mode, n, ts, tmp_path / "ckpt")


def test_cli_eval_graph_split(tmp_path: Path) -> None:
    check_cli_graph_split("gemma3", TINY, PROMPT, tmp_path / "ckpt")


def test_gguf_matches_transformers(tmp_path: Path) -> None:
    """llama.cpp's layout: norms hold w + 1; the layer pattern (every 6th global), the local
    RoPE base and (below 62 layers) the head-dim attention scale are llama.cpp's constants."""
    pytest.importorskip("gguf")
    from backends.cuda.weights.hf_checkpoint import HFCheckpoint
    from backends.cuda.weights.sources import reference_weights
    from graphir.models import gguf_writer

    config = dict(TINY, hidden_size=32, intermediate_size=32, num_hidden_layers=7, head_dim=16,
                  query_pre_attn_scalar=16, sliding_window_pattern=6, rope_parameters=None,
                  rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    model = hf_model("gemma3", **config)
    ckpt = save(model, tmp_path / "ckpt")
    cfg = load_source(ckpt).cfg
    src = HFCheckpoint(ckpt, cfg)
    arrays = {}
    for name, info in reference_weights(cfg).items():
        t = src.get(info).to(torch.float32)
        arrays[name] = (t + 1.0 if info.norm_offset == 1.0 else t).numpy()
    path = tmp_path / "g.gguf"
    gguf_writer.write_gguf(path, cfg, types={k: "f32" for k in arrays}, arrays=arrays)
    back = load_source(path)
    skip = {"name", "max_position_embeddings", "torch_dtype"}
    assert back.cfg.model_dump(exclude=skip) == cfg.model_dump(exclude=skip)
    logits, gen = greedy(Session(back, None, "cpu", 16), PROMPT, 3)
    assert rel_err(logits, hf_logits(model, PROMPT + gen)) < TOL


@pytest.mark.parametrize("rig", RIGS)
def test_predict_runs_on_every_rig(rig: str, capsys: pytest.CaptureFixture[str]) -> None:
    """27 B in Q4_K_M fits every rig."""
    check_predict("gemma-3-27b", rig, capsys)


@pytest.mark.parametrize("split,n", [(None, 1), ("layer", 2), ("graph", 3)])
def test_node_estimate_is_exact_for_tiny_configs(split: str | None, n: int) -> None:
    """With the soft-capped head; graph split counts as the layer split it is."""
    from passes import PassContext, count_nodes, estimate_nodes, run_pipeline

    cfg = from_hf_dict(dict(TINY, model_type="gemma3_text", final_logit_softcapping=30.0))
    for phase in ("pp", "tg"):
        opts = BuildOptions(phase=phase)  # type: ignore[arg-type]
        devs = tuple(f"cuda:{k}" for k in range(n))
        g = run_pipeline(build(cfg, opts), (f"place_{split}",) if split else (), PassContext(cfg=cfg, devices=devs)).graph
        assert estimate_nodes(cfg, opts, split=split, devices=devs).exact == count_nodes(g).total
        assert g.by_op(Op.SOFTCAP) and g.by_op(Op.GEGLU)
