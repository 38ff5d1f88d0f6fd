"""Gemma 4 (text) against transformers (the oracle): parameter counts, logits of random
checkpoints written by `save_pretrained` (unplaced, layer split, and graph split, which for
this family is layer split as in ik_llama.cpp), the multimodal wrapper's config, a GGUF in
llama.cpp's layout (rope_freqs, *_swa keys, KV heads per layer), node counts and predictions.

The tiny configs keep what makes Gemma 4 differ from Gemma 3: full layers with a larger head
and fewer KV heads whose values are the keys (attention_k_eq_v), proportional RoPE on them
(only the first quarter of the NeoX pairs turns), unscaled attention, a weightless norm of the
values, plain (w, not 1 + w) norm weights and a learnt scalar per layer (transformers keeps it
as a buffer, `layer_scalar`, which the test helpers draw off 1). Prompts are longer than the
sliding window, so a layer taking the other kind's window, head size or RoPE shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import check_logits, hf_logits, hf_model, hf_params, rel_err, save
from cli.main import main
from helpers.whole_layers import RIGS, SPLITS, check_cli_graph_split, check_predict, check_split
from graphir.models import BuildOptions, build, from_hf_dict
from graphir.models.config import ConfigError
from graphir.models.sources import load_preset, load_source
from graphir.ops import Op
from graphir.stats import graph_stats

TOL = 1e-4
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ROPE = {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
TINY = dict(vocab_size=40, hidden_size=24, intermediate_size=20, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
            attention_k_eq_v=True, sliding_window=3, final_logit_softcapping=3.0, hidden_size_per_layer_input=0,
            layer_types=["sliding_attention", "full_attention"] * 2, rope_parameters=ROPE)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]


@st.composite
def configs(draw: st.DrawFn) -> dict:
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 2))
    n = draw(st.integers(1, 4))
    full: dict = {"rope_type": "default", "rope_theta": 1e6}
    if draw(st.booleans()):
        full = {"rope_type": "proportional", "partial_rotary_factor": draw(st.sampled_from([0.25, 0.5, 1.0])),
                "rope_theta": 1e6}
    return dict(vocab_size=draw(st.sampled_from([37, 50])), hidden_size=draw(st.sampled_from([16, 24])),
                intermediate_size=draw(st.sampled_from([12, 20])), num_hidden_layers=n,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=draw(st.sampled_from([4, 8])),
                global_head_dim=draw(st.sampled_from([8, 16])),
                num_global_key_value_heads=draw(st.sampled_from([h for h in (1, 2) if heads % h == 0])),
                attention_k_eq_v=draw(st.booleans()), sliding_window=draw(st.integers(1, 6)),
                final_logit_softcapping=draw(st.sampled_from([None, 2.0])), hidden_size_per_layer_input=0,
                layer_types=draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=n,
                                          max_size=n)),
                rope_parameters={"full_attention": full,
                                 "sliding_attention": {"rope_type": "default",
                                                       "rope_theta": draw(st.sampled_from([1e4, 10.0]))}},
                tie_word_embeddings=draw(st.booleans()))


@SETTINGS
@given(d=configs())
def test_params_match_transformers(d: dict) -> None:
    """transformers holds each layer's output scale as a (saved) buffer, not a parameter: one
    value per layer on top of its count."""
    d = dict(d, model_type="gemma4_text")
    cfg = from_hf_dict(d)
    assert graph_stats(build(cfg, BuildOptions(phase="tg"))).params_total == hf_params(d) + cfg.n_layer


def test_preset_and_its_multimodal_wrapper() -> None:
    """gemma-4-31b: 30.7 B parameters (the model card's); the published config.json (the
    Gemma4ForConditionalGeneration wrapper, decoder under text_config) reads the same."""
    cfg = load_preset("gemma-4-31b")
    total = graph_stats(build(cfg, BuildOptions(phase="tg"))).params_total
    assert total == 30_697_345_340 == 30_697_345_280 + cfg.n_layer
    text = {"attention_k_eq_v": True, "final_logit_softcapping": 30.0, "global_head_dim": 512, "head_dim": 256,
            "hidden_size": 5376, "hidden_size_per_layer_input": 0, "intermediate_size": 21504,
            "layer_types": list(cfg.layer_types), "max_position_embeddings": 262144, "model_type": "gemma4_text",
            "num_attention_heads": 32, "num_global_key_value_heads": 4, "num_hidden_layers": 60,
            "num_key_value_heads": 16, "num_kv_shared_layers": 0, "sliding_window": 1024,
            "rope_parameters": ROPE | {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1e6,
                                                          "rope_type": "proportional"}},
            "enable_moe_block": False, "use_double_wide_mlp": False, "tie_word_embeddings": True}
    wrapper = {"model_type": "gemma4", "dtype": "bfloat16", "vision_config": {"model_type": "gemma4_vision"},
               "text_config": text}
    assert from_hf_dict(wrapper, name=cfg.name) == cfg
    assert cfg.layer_types.count("full_attention") == 10 and cfg.window(0) == 1024 and cfg.window(5) is None
    g = build(cfg.with_layers(6), BuildOptions(phase="tg"))
    assert g["blk.0.q_rope"].attr == {"n_rot": 256, "theta": 10000.0}
    assert g["blk.5.q_rope"].attr["n_rot"] == 512 and g["blk.5.q_rope"].attr["rot_pairs"] == 64
    assert g["blk.5.q_rope"].attr["theta"] == 1e6 and g["blk.5.q_rope"].attr["scaling"] == "proportional"
    assert g["blk.0.kqv"].attr["scale"] == 1.0 and g["inp_embd"].attr["scale"] == 5376 ** 0.5
    assert tuple(g["blk.5.cache_k"].spec.shape) == ("KV", 4, 512) and tuple(g["blk.0.cache_k"].spec.shape) == ("KV", 16, 256)
    names = {n.name for n in g.nodes}
    assert "blk.5.attn_v.weight" not in names and "blk.0.attn_v.weight" in names  # K = V on full layers
    assert len(g.by_op(Op.RMS_NORM_PLAIN)) == 6 and not any(n.attr.get("offset") for n in g.by_op(Op.RMS_NORM))


def test_config_errors_are_one_line() -> None:
    for key, value, match in (("hidden_size_per_layer_input", 256, "per-layer inputs"),
                              ("num_kv_shared_layers", 2, "shared KV layers"),
                              ("enable_moe_block", True, "MoE block"),
                              ("use_bidirectional_attention", "all", "bidirectional"),
                              ("hidden_activation", "silu", "gelu_pytorch_tanh"),
                              ("per_layer_config", {"0": {"head_dim": 16}}, "only the full_attention layers"),
                              ("per_layer_config", {"1": {"head_dim": 16}, "3": {"head_dim": 8}}, "only one head_dim"),
                              ("num_global_key_value_heads", 3, "not a multiple of num_global_key_value_heads")):
        with pytest.raises(ConfigError, match=match):
            from_hf_dict(dict(TINY, model_type="gemma4_text", **{key: value}))
    with pytest.raises(ConfigError, match="full layers' rope_type 'linear'"):
        from_hf_dict(dict(TINY, model_type="gemma4_text", rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))


@SETTINGS
@given(config=configs(), prompt=st.lists(st.integers(0, 36), min_size=7, max_size=11), split=st.integers(1, 6),
       seed=st.integers(0, 3))
def test_matches_transformers(tmp_path_factory: pytest.TempPathFactory, config: dict, prompt: list[int],
                              split: int, seed: int) -> None:
    check_logits("gemma4", config, tmp_path_factory.mktemp("gemma4"), prompt, split, seed)


@pytest.mark.parametrize("mode,n,ts", SPLITS)
def test_split_matches_transformers(mode: str, n: int, ts: str, tmp_path: Path) -> None:
    check_split("gemma4", TINY, PROMPT, mode, n, ts, tmp_path / "ckpt")


def test_cli_eval_graph_split(tmp_path: Path) -> None:
    check_cli_graph_split("gemma4", TINY, PROMPT, tmp_path / "ckpt")


def test_gguf_matches_transformers(tmp_path: Path) -> None:
    """llama.cpp's layout: head size and RoPE dims of the full layers in key_length and
    rope.dimension_count (the sliding ones' as *_swa), KV heads per layer, the layer pattern as
    booleans, no attn_v where values are the keys, the proportional RoPE as rope_freqs."""
    gguf = pytest.importorskip("gguf")
    from backends.cuda.weights.hf_checkpoint import HFCheckpoint
    from backends.cuda.weights.sources import reference_weights
    from graphir.models import gguf_writer

    model = hf_model("gemma4", **TINY)
    ckpt = save(model, tmp_path / "ckpt")
    cfg = load_source(ckpt).cfg
    src = HFCheckpoint(ckpt, cfg)
    arrays = {name: src.get(info).to(torch.float32).numpy() for name, info in reference_weights(cfg).items()}
    path = tmp_path / "g.gguf"
    gguf_writer.write_gguf(path, cfg, types={k: "f32" for k in arrays}, arrays=arrays)
    reader = gguf.GGUFReader(str(path))  # the gguf package reads what llama.cpp's loader reads
    field = reader.fields["gemma4.attention.sliding_window_pattern"]
    assert [bool(field.parts[i][0]) for i in field.data] == [True, False, True, False]
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.data.tolist() == [1.0, 1.0] + [float(np.float32(1e30))] * 6
    assert "blk.1.attn_v.weight" not in {t.name for t in reader.tensors}
    back = load_source(path)
    skip = {"name", "max_position_embeddings", "torch_dtype"}
    assert back.cfg.model_dump(exclude=skip) == cfg.model_dump(exclude=skip)
    logits, gen = greedy(Session(back, None, "cpu", 16), PROMPT, 3)
    assert rel_err(logits, hf_logits(model, PROMPT + gen)) < TOL


@pytest.mark.parametrize("rig", RIGS)
def test_predict_runs_on_every_rig(rig: str, capsys: pytest.CaptureFixture[str]) -> None:
    """31 B in Q4_K_M fits every rig."""
    check_predict("gemma-4-31b", rig, capsys)


def test_predict_bf16_on_2x3090_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "gemma-4-31b", "--hw", "2x3090", "--split", "layer"]) != 0
    err = capsys.readouterr().err
    assert "does not fit" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("split,n", [(None, 1), ("layer", 2), ("graph", 3)])
def test_node_estimate_is_exact_for_tiny_configs(split: str | None, n: int) -> None:
    """With and without values shared with the keys; graph split counts as the layer split it is."""
    from passes import PassContext, count_nodes, estimate_nodes, run_pipeline

    for k_eq_v in (True, False):
        cfg = from_hf_dict(dict(TINY, model_type="gemma4_text", attention_k_eq_v=k_eq_v))
        for phase in ("pp", "tg"):
            opts = BuildOptions(phase=phase)  # type: ignore[arg-type]
            devs = tuple(f"cuda:{k}" for k in range(n))
            g = run_pipeline(build(cfg, opts), (f"place_{split}",) if split else (),
                             PassContext(cfg=cfg, devices=devs)).graph
            assert estimate_nodes(cfg, opts, split=split, devices=devs).exact == count_nodes(g).total
            assert g.by_op(Op.SOFTCAP) and g.by_op(Op.GEGLU) and g.by_op(Op.RMS_NORM_PLAIN)


def test_node_estimate_bounds_the_preset() -> None:
    from passes import count_nodes, estimate_nodes

    cfg = load_preset("gemma-4-31b")
    for phase in ("pp", "tg"):
        opts = BuildOptions(phase=phase)  # type: ignore[arg-type]
        built = count_nodes(build(cfg, opts)).total
        est = estimate_nodes(cfg, opts).exact
        assert built <= est <= 1.05 * built
