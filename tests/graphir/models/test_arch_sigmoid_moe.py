"""GLM-4.5 (glm4_moe) and MiniMax-M2 (minimax_m2): the sigmoid-routed MoE families (the node
count test also covers deepseek_v3, which routes the same way).

The oracle is transformers with random weights (saved with `save_pretrained`, the selection
bias `e_score_correction_bias` drawn too): graphir's logits equal transformers' within 1e-4
relative in f32 for prefill and greedy decode, unplaced, under layer split and under graph
split over 2-4 logical CPU devices with uneven ratios, and from a GGUF file laid out as
llama.cpp's converter writes it. Parameter counts equal transformers' (parameters plus the
saved bias buffers) on random configs; presets price on every rig and split mode.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import check_low_precision, hf_checkpoint_numel, hf_logits, hf_model, rel_err, save
from cli.main import main
from helpers.cli_oracle import cli_eval
from graphir.models import BuildOptions, build, from_hf_dict
from graphir.models.config import ConfigError
from graphir.models.sources import load_source
from graphir.ops import Op
from graphir.stats import graph_stats

TOL = 1e-4
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# MiniMaxM2Config's default bos/eos ids lie outside a tiny vocabulary: transformers warns
NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
FIXED = {
    # 8 experts in 4 groups, 2 groups kept: the group limit changes which experts win
    "glm4_moe": dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=3,
                     moe_intermediate_size=32, n_shared_experts=1, attention_bias=True, use_qk_norm=True,
                     routed_scaling_factor=2.5, n_group=4, topk_group=2, first_k_dense_replace=1),
    "minimax_m2": dict(vocab_size=40, hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=3, head_dim=8, num_local_experts=5, num_experts_per_tok=2, rotary_dim=4,
                       **NO_IDS),
}


@st.composite
def glm_configs(draw: st.DrawFn) -> dict:
    kv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 4]))
    E = groups * draw(st.integers(2, 3))
    used = draw(st.integers(1, groups))
    return dict(vocab_size=37, hidden_size=kv * 2 * 6, intermediate_size=draw(st.sampled_from([12, 20])),
                num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=kv * 2, num_key_value_heads=kv,
                head_dim=draw(st.sampled_from([4, 8])), n_routed_experts=E,
                num_experts_per_tok=draw(st.integers(1, min(3, used * E // groups))),
                moe_intermediate_size=draw(st.sampled_from([6, 8])), n_shared_experts=draw(st.integers(1, 2)),
                attention_bias=draw(st.booleans()), use_qk_norm=draw(st.booleans()),
                routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])), n_group=groups, topk_group=used,
                first_k_dense_replace=draw(st.integers(0, 1)), norm_topk_prob=draw(st.booleans()),
                partial_rotary_factor=draw(st.sampled_from([0.5, 1.0])), tie_word_embeddings=draw(st.booleans()))


@st.composite
def minimax_configs(draw: st.DrawFn) -> dict:
    kv = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8]))
    E = draw(st.integers(3, 6))
    return dict(vocab_size=37, hidden_size=18, intermediate_size=draw(st.sampled_from([6, 10])),
                num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=kv * draw(st.integers(1, 2)),
                num_key_value_heads=kv, head_dim=d, num_local_experts=E, num_experts_per_tok=draw(st.integers(1, 3)),
                rotary_dim=draw(st.sampled_from([2, d])), rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])), **NO_IDS)


STRATEGIES = {"glm4_moe": glm_configs(), "minimax_m2": minimax_configs()}


def _hf(arch: str, config: dict, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_model(arch, seed=seed, **config)


@pytest.mark.parametrize("arch", sorted(STRATEGIES))
def test_matches_transformers(arch: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    @SETTINGS
    @given(config=STRATEGIES[arch], split=st.integers(1, 6), seed=st.integers(0, 3))
    def check(config: dict, split: int, seed: int) -> None:
        model = _hf(arch, config, seed)
        source = load_source(save(model, tmp_path_factory.mktemp(arch)))
        whole, generated = greedy(Session(source, None, "cpu", 32), PROMPT, 4)
        ref = hf_logits(model, PROMPT + generated)
        assert rel_err(whole, ref) < TOL, config
        s = Session(source, None, "cpu", 32)
        parts = [s.prefill(PROMPT[:split]), s.prefill(PROMPT[split:]), s.decode(generated)]
        assert rel_err(torch.cat(parts), ref) < TOL, (split, config)

    check()


PLACEMENTS = [  # (devices, split, ts): uneven ratios, 2 to 4 logical devices
    ("cpu,cpu", "layer", "3,1"),
    ("cpu,cpu,cpu", "layer", "1,2,1"),
    ("cpu,cpu", "graph", "2,1"),
    ("cpu,cpu,cpu", "graph", "3,2,1"),
    ("cpu,cpu,cpu,cpu", "graph", "1,1,2,3"),
    ("cpu,cpu", "graph", "1,2", "default"),  # with the CUDA backend's default passes after the split
    ("cpu,cpu,cpu", "layer", "2,1,1", "default"),
]


@pytest.mark.parametrize("placement", PLACEMENTS, ids="-".join)
@pytest.mark.parametrize("arch", sorted(FIXED))
def test_cli_eval_placed_matches_transformers(arch: str, placement: tuple[str, ...], tmp_path: Path) -> None:
    from cli.run import DEFAULT_PASSES

    devices, split, ts = placement[:3]
    model = _hf(arch, FIXED[arch], seed=1)
    passes = ["--passes", DEFAULT_PASSES] if placement[3:] else []
    err, generated, greedy_ref = cli_eval(model, save(model, tmp_path / "ckpt"), PROMPT, 4,
                                          "--devices", devices, "--split", split, "--ts", ts, *passes)
    assert err < TOL and generated == greedy_ref


def test_graph_split_follows_ik_llama_cpp() -> None:
    """MiniMax-M2: wq / wk whole on every device (the norm spans all heads), each device slices
    its heads; wv, wo and the KV cache split by KV head. GLM: attention by KV heads, routed
    experts by intermediate columns, the shared expert like a dense FFN, the router and its
    selection bias replicated; the dense first layer's FFN by rows."""
    passes = pytest.importorskip("passes")
    devs = ("cpu:0", "cpu:1", "cpu:2")
    mm = from_hf_dict({"model_type": "minimax_m2", **FIXED["minimax_m2"]})
    g = passes.run_pipeline(build(mm, BuildOptions(phase="tg")), ("place_graph",),
                            passes.PassContext(cfg=mm, devices=devs)).graph
    H, d, hkv = mm.hidden_size, mm.head_dim, mm.n_kv_head
    for j in range(3):
        assert g[f"blk.0.attn_q.weight#{j}"].spec.shape == (mm.n_head * d, H)  # whole
        assert g[f"blk.0.attn_v.weight#{j}"].spec.shape == (d, H)  # one KV head each
        assert g[f"blk.0.cache_k#{j}"].spec.shape[1] == 1
        assert g[f"blk.0.q_rope.heads#{j}"].op == Op.SLICE
    assert len(g.by_op(Op.ALL_REDUCE)) == 2 * mm.n_layer
    glm = from_hf_dict({"model_type": "glm4_moe", **FIXED["glm4_moe"]})
    g = passes.run_pipeline(build(glm, BuildOptions(phase="tg")), ("place_graph",),
                            passes.PassContext(cfg=glm, devices=devs[:2], ts=(1.0, 1.0))).graph
    N, Ns = glm.moe_intermediate_size, glm.shared_expert_intermediate_size
    assert g["blk.1.ffn_gate_exps.weight#0"].spec.shape == (glm.n_expert, N // 2, glm.hidden_size)
    assert g["blk.1.ffn_up_shexp.weight#1"].spec.shape == (Ns // 2, glm.hidden_size)
    assert g["blk.1.exp_probs_b.bias#1"].spec.shape == (glm.n_expert,)
    rows = [g[f"blk.0.ffn_up.weight#{j}"].spec.shape[0] for j in range(2)]  # granules of 16 rows
    assert sum(rows) == glm.intermediate_size and 0 < min(rows)


def test_gguf_matches_safetensors(tmp_path: Path) -> None:
    """A GGUF in llama.cpp's layout (glm4moe / minimax-m2 metadata, exp_probs_b, shared experts,
    post_attention_norm) loads to the same config and logits as the safetensors checkpoint."""
    from backends.cuda.weights.hf_checkpoint import HFCheckpoint
    from graphir.models import gguf_writer
    from graphir.models.weights import reference_weights

    for arch, config in FIXED.items():
        ckpt = save(_hf(arch, config, seed=2), tmp_path / arch)
        st_src = load_source(ckpt)
        ref, gen = greedy(Session(st_src, None, "cpu", 16), PROMPT, 3)
        src = HFCheckpoint(ckpt, st_src.cfg)
        tensors = {n: src.get(i).to(torch.float32).numpy() for n, i in reference_weights(st_src.cfg).items()}
        path = tmp_path / f"{arch}.gguf"
        gguf_writer.write_specs(path, st_src.cfg, gguf_writer.tensor_specs(st_src.cfg),
                                types={n: "f32" for n in tensors}, arrays=tensors)
        g_src = load_source(path)
        ignored = {"name", "max_position_embeddings", "torch_dtype"}
        assert g_src.kind == "gguf" and g_src.cfg.model_dump(exclude=ignored) == st_src.cfg.model_dump(exclude=ignored)
        s = Session(g_src, None, "cpu", 16)
        assert rel_err(torch.cat([s.prefill(PROMPT), s.decode(gen)]), ref) < 1e-5, arch


@pytest.mark.parametrize("arch", sorted(STRATEGIES))
def test_params_match_transformers(arch: str) -> None:
    @settings(max_examples=15, deadline=None)
    @given(config=STRATEGIES[arch])
    def check(config: dict) -> None:
        d = {"model_type": arch, **config}
        assert graph_stats(build(from_hf_dict(d), BuildOptions(phase="tg"))).params_total == hf_checkpoint_numel(d)

    check()


@pytest.mark.parametrize("change,msg", [
    ({"scoring_func": "softmax"}, "sigmoid routing only"),
    ({"n_group": 3}, "n_group=3 must divide"),
    ({"topk_group": 5}, "topk_group=5"),
    ({"first_k_dense_replace": 9}, "first_k_dense_replace=9"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
])
def test_bad_glm_configs_are_one_line_errors(change: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        from_hf_dict({"model_type": "glm4_moe", **FIXED["glm4_moe"], **change})


def test_config_json_spellings(tmp_path: Path) -> None:
    """The released MiniMax-M2 config gives RoPE's part as rotary_dim; GLM's MoE comes from
    n_routed_experts, n_shared_experts and first_k_dense_replace."""
    mm = from_hf_dict({"model_type": "minimax_m2", **FIXED["minimax_m2"]})
    assert mm.n_rot == 4 and mm.moe_intermediate_size == FIXED["minimax_m2"]["intermediate_size"]
    glm = from_hf_dict({"model_type": "glm4_moe", **FIXED["glm4_moe"]})
    assert glm.mlp_only_layers == (0,) and glm.shared_expert_intermediate_size == 32 and glm.n_rot == 4
    assert not glm.is_moe_layer(0) and glm.is_moe_layer(1)
    saved = json.loads((save(_hf("glm4_moe", FIXED["glm4_moe"]), tmp_path / "c") / "config.json").read_text())
    assert from_hf_dict(saved).model_dump(exclude={"torch_dtype"}) == glm.model_dump(exclude={"torch_dtype"})


PRESETS = ["glm-4.5-air", "glm-4.5", "glm-4.7", "minimax-m2"]


@pytest.mark.parametrize("hw", ["2x3090", "4x3090", "2xH200"])
@pytest.mark.parametrize("name", PRESETS)
def test_predict_every_preset_on_every_rig(name: str, hw: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Both split modes price; the bf16 weights overflow the 3090 rigs (and GLM-4.5 two H200s):
    a clean does-not-fit error, then --allow-overflow prices it anyway."""
    out = tmp_path / "p.csv"
    args = ["predict", name, "--hw", hw, "--ctx", "4096", "--ubatch", "512", "--tg", "16", "--split", "layer,graph",
            "--quant", "Q4_K_M", "--format", "csv", "-o", str(out)]
    capsys.readouterr()
    rc = main(args)
    if rc != 0:
        assert rc == 2 and "does not fit" in capsys.readouterr().err and not out.exists()
        assert main(args + ["--allow-overflow"]) == 0
    text = out.read_text()
    assert "layer" in text and "graph" in text


MLA = dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=3, num_attention_heads=6,
           num_key_value_heads=6, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, kv_lora_rank=16,
           qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5, n_group=4, topk_group=2, **NO_IDS)
COUNTED = [  # every family of this issue and its options
    {"model_type": "glm4_moe", **FIXED["glm4_moe"]},
    {"model_type": "glm4_moe", **FIXED["glm4_moe"], "attention_bias": False, "use_qk_norm": False, "n_group": 1,
     "topk_group": 1, "first_k_dense_replace": 0},
    {"model_type": "minimax_m2", **FIXED["minimax_m2"]},
    {"model_type": "deepseek_v3", **MLA, "q_lora_rank": 12},
    {"model_type": "deepseek_v3", **MLA, "q_lora_rank": None, "first_k_dense_replace": 0},
]


@pytest.mark.parametrize("split,n", [(None, 1), ("layer", 2), ("graph", 2), ("graph", 3)])
@pytest.mark.parametrize("d", COUNTED, ids=lambda d: d["model_type"])
def test_node_estimate_is_exact(d: dict, split: str | None, n: int) -> None:
    """The closed-form node count equals the built (and placed) graph's, both phases."""
    passes = pytest.importorskip("passes")
    cfg = from_hf_dict(d)
    devs = tuple(f"cuda:{k}" for k in range(n))
    for phase in ("pp", "tg"):
        opts = BuildOptions(phase=phase)
        g = passes.run_pipeline(build(cfg, opts), (f"place_{split}",) if split else (),
                                passes.PassContext(cfg=cfg, devices=devs), verify_each=False).graph
        assert passes.estimate_nodes(cfg, opts, split=split, devices=devs).exact == len(g.nodes)


@pytest.mark.parametrize("d", COUNTED[::2], ids=lambda d: d["model_type"])
def test_auto_placement_matches_unplaced(d: dict) -> None:
    """`--split auto` (the cost-model search) on four logical devices keeps the logits."""
    from cli.run import make_transform

    cfg = from_hf_dict(d)
    devs = tuple(f"cpu:{k}" for k in range(4))
    ref, gen = greedy(Session(cfg, "random", "cpu", 16, seed=3), PROMPT, 3)
    s = Session(cfg, "random", "cpu:0", 16, seed=3,
                transform=make_transform(cfg, devs, "auto", ubatch=8, tg=4, ctx=16, hw="4xH200"))
    got = torch.cat([s.prefill(PROMPT[:5]), s.prefill(PROMPT[5:]), s.decode(gen)])
    assert rel_err(got, ref) < 1e-5 and len(s.graphs["pp"].device_list()) > 1


@pytest.mark.parametrize("d", COUNTED, ids=lambda d: d["model_type"])
def test_cuda_rule_table_falls_back_for_the_new_ops(d: dict) -> None:
    """The CUDA table (fast-path overrides, eager kernels for ops it does not know: the biased
    top-k, sigmoid weights, head_matmul) gives the reference table's logits; on CPU tensors the
    overrides take their fallbacks, so this checks the wiring, not the GPU kernels."""
    from backends.cuda.rules.rule_table import CUDA_KERNELS

    cfg = from_hf_dict(d)
    ref, gen = greedy(Session(cfg, "random", "cpu", 16, seed=3), PROMPT, 3)
    s = Session(cfg, "random", "cpu", 16, seed=3, kernels=CUDA_KERNELS)
    assert rel_err(torch.cat([s.prefill(PROMPT[:5]), s.prefill(PROMPT[5:]), s.decode(gen)]), ref) < 1e-5


@pytest.mark.parametrize("d", COUNTED[::2], ids=lambda d: d["model_type"])
def test_bf16_agrees_with_f32(d: dict, tmp_path: Path) -> None:
    """bf16 / f16 runs stay as close to the f32 run as transformers' own bf16 / f16 runs do (a
    model-dependent tolerance measured on the oracle, floor 3%), as for the other families."""
    model = _hf(d["model_type"], {k: v for k, v in d.items() if k != "model_type"})
    check_low_precision(model, save(model, tmp_path / "ckpt"), PROMPT)
