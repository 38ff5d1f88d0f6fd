"""Seed-OSS, Ministral 3 / Devstral 2 (and the Mistral Large shape), ERNIE 4.5 MoE and
Hunyuan-A13B against transformers.

Oracles: transformers' parameter count on the meta device; transformers' logits of a random
checkpoint written with `save_pretrained` for prefill and greedy decode, unplaced, under layer
split and graph split over 2-4 CPU devices with uneven ratios, and from a GGUF file in
llama.cpp's converter layout; the built graph for the node-count estimate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cuda.weights.gguf_weights import permute_rope
from backends.cuda.weights.hf_checkpoint import HFCheckpoint
from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import hf_logits, hf_model, rel_err, save
from backends.cuda.weights.sources import reference_weights
from cli.main import main
from graphir.models import BuildOptions, ConfigError, build, from_hf_dict
from graphir.models import gguf_writer
from graphir.models.gguf_source import PERMUTED_QK
from graphir.models.sources import load_source
from graphir.ops import Op
from passes import PassContext, count_nodes, estimate_nodes, run_pipeline
from helpers.hf_checks import attention_sizes, check_against_hf
from helpers.params import graphir_params, hf_params

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TOL = 1e-4
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]


@st.composite
def seed_oss_configs(draw: st.DrawFn) -> dict:
    c = draw(attention_sizes())
    c.update(attention_bias=draw(st.booleans()), attention_out_bias=draw(st.booleans()))
    return c


@st.composite
def yarn(draw: st.DrawFn) -> dict:
    """Ministral 3's rope block; a short pre-YaRN context so the query temperature changes
    within the test's 13 positions."""
    r = {"rope_type": "yarn", "rope_theta": draw(st.sampled_from([10000.0, 1e6])),
         "factor": draw(st.sampled_from([2.0, 16.0])), "original_max_position_embeddings": draw(st.sampled_from([2, 4, 8])),
         "beta_fast": 32.0, "beta_slow": 1.0, "llama_4_scaling_beta": draw(st.sampled_from([0.0, 0.1, 0.5]))}
    if draw(st.booleans()):  # mscale == mscale_all_dim: attention factor 1 (Devstral 2); else 0.1 ln(factor) + 1
        r.update(mscale=1.0, mscale_all_dim=draw(st.sampled_from([1.0, 0.5])))
    return r


@st.composite
def ministral3_configs(draw: st.DrawFn) -> dict:
    return dict(draw(attention_sizes()), rope_parameters=draw(yarn()))


@st.composite
def ernie_configs(draw: st.DrawFn) -> dict:
    """ERNIE 4.5 MoE: head_dim is hidden / heads (even: RoPE pairs are interleaved), leading
    dense layers, an MoE interval, 0-2 shared experts."""
    c = draw(attention_sizes())
    c["hidden_size"] = c["num_attention_heads"] * draw(st.sampled_from([4, 6, 8]))
    c.pop("head_dim")
    e = draw(st.integers(3, 6))
    n = c["num_hidden_layers"] = draw(st.integers(2, 4))
    c.update(moe_num_experts=e, moe_k=draw(st.integers(2, min(e, 3))), moe_intermediate_size=draw(st.sampled_from([7, 12])),
             moe_num_shared_experts=draw(st.integers(0, 2)), moe_layer_start_index=draw(st.integers(0, 1)),
             moe_layer_end_index=draw(st.sampled_from([-1, n - 1])), moe_layer_interval=draw(st.integers(1, 2)))
    return c


@st.composite
def hunyuan_configs(draw: st.DrawFn) -> dict:
    """Hunyuan: experts and the shared MLP are intermediate_size wide; NTK-alpha RoPE or none."""
    c = draw(attention_sizes(head_dims=(4, 6, 8)))
    e = draw(st.integers(3, 6))
    c.update(num_experts=e, moe_topk=draw(st.integers(1, min(e, 3))), use_qk_norm=True, use_cla=False)
    if draw(st.booleans()):
        c["rope_parameters"] = {"rope_type": "dynamic", "alpha": draw(st.sampled_from([10.0, 1000.0])), "factor": 1.0,
                                "rope_theta": 10000.0}
    return c


CASES = st.one_of(seed_oss_configs().map(lambda c: ("seed_oss", c)),
                  ministral3_configs().map(lambda c: ("ministral3", c)),
                  ernie_configs().map(lambda c: ("ernie4_5_moe", c)),
                  hunyuan_configs().map(lambda c: ("hunyuan_v1_moe", c)))


# ---- parameter counts -----------------------------------------------------------------------

@settings(SETTINGS, max_examples=48)
@given(case=CASES)
def test_params_match_transformers(case: tuple[str, dict]) -> None:
    d = dict(case[1], model_type=case[0])
    assert graphir_params(d) == hf_params(d)


def test_config_reads_the_new_keys() -> None:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=16)
    seed = from_hf_dict(dict(base, model_type="seed_oss"))  # SeedOssConfig: QKV bias on, output bias off
    assert seed.attention_bias and not seed.out_bias and seed.head_dim == 128 and seed.n_kv_head == 8
    mini = from_hf_dict(dict(base, model_type="ministral3", rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}))
    assert (mini.attn_temperature_beta, mini.attn_temperature_len) == (0.1, 16384)
    q = build(mini, BuildOptions(phase="tg"))["blk.0.q_rope"]
    assert q.attr["attn_factor"] == 1.0  # mscale / mscale_all_dim cancel, as transformers computes
    assert len(build(mini, BuildOptions(phase="tg")).by_op(Op.ATTN_TEMP)) == 2
    hy = dict(base, model_type="hunyuan_v1_moe", num_key_value_heads=4, head_dim=8, num_experts=4, moe_topk=[2, 2],
              rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})
    cfg = from_hf_dict(hy)
    assert cfg.n_expert_used == 2 and cfg.rope_theta == 10000.0 * 1000.0 ** (8 / 6) and not cfg.rope_scaling
    g = build(cfg, BuildOptions(phase="tg"))
    assert g["blk.0.attn_q_norm"].inputs[0] == "blk.0.q_rope"  # Hunyuan normalises the rotated heads
    for bad, what in ((dict(use_cla=True), "use_cla"), (dict(use_qk_norm=False), "use_qk_norm"),
                      (dict(moe_topk=[2, 1]), "moe_topk"), (dict(moe_intermediate_size=[16, 16]), "moe_intermediate_size"),
                      (dict(num_shared_expert=2), "num_shared_expert")):
        with pytest.raises(ConfigError, match=what):
            from_hf_dict({**hy, **bad})
    with pytest.raises(ConfigError, match="sliding_window"):  # Mistral 7B v0.1's window is not modelled
        from_hf_dict(dict(base, model_type="mistral", num_key_value_heads=4, sliding_window=4096))
    with pytest.raises(ConfigError, match="use_bias"):
        from_hf_dict(dict(base, model_type="ernie4_5_moe", num_key_value_heads=4, use_bias=True))


# ---- the new kernels against transformers' functions and plain torch -------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_temp_kernel_is_transformers_llama4_scale(dtype: torch.dtype) -> None:
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    from helpers.ops import run_op

    q = torch.randn(9, 3, 4).to(dtype)
    pos = torch.tensor([0, 1, 3, 4, 7, 8, 15, 16, 100], dtype=torch.int32)
    got = run_op(Op.ATTN_TEMP, q, pos, beta=0.1, length=4)
    scale = get_llama_4_attn_scale(pos[None].long(), 0.1, 4)[0, 0].to(dtype)  # [T,1]
    torch.testing.assert_close(got, q * scale[:, None, :], rtol=0, atol=0)


def test_moe_topk_bias_kernel_chooses_with_the_bias() -> None:
    from helpers.ops import run_op

    logits = torch.randn(6, 5)
    bias = torch.tensor([0.0, 2.0, 0.0, -2.0, 0.5])
    got = run_op(Op.MOE_TOPK_BIAS, logits, bias, k=2)
    want = torch.topk(torch.softmax(logits, -1) + bias, 2, dim=-1).indices.to(torch.int32)
    assert torch.equal(got, want) and (got == 1).any(dim=1).all()  # the +2 expert always chosen


# ---- logits against transformers ------------------------------------------------------------

@settings(SETTINGS, max_examples=48)
@given(case=CASES, prompt=st.lists(st.integers(0, 36), min_size=7, max_size=11), split=st.integers(1, 6),
       seed=st.integers(0, 3))
def test_matches_transformers(tmp_path_factory: pytest.TempPathFactory, case: tuple[str, dict], prompt: list[int],
                              split: int, seed: int) -> None:
    arch, config = case
    check_against_hf(arch, config, tmp_path_factory.mktemp(arch), prompt, split, seed)


BASE = dict(vocab_size=48, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-6)
FIXED = {
    "seed_oss": dict(BASE, attention_bias=True, attention_out_bias=False),
    "seed_oss_out_bias": dict(BASE, attention_bias=False, attention_out_bias=True),
    "ministral3": dict(BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                              "original_max_position_embeddings": 4, "beta_fast": 32.0,
                                              "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                              "llama_4_scaling_beta": 0.3}),
    # no head_dim key (hidden / heads = 8); layer 0 dense, then MoE with 2 shared experts
    "ernie4_5_moe": dict({k: v for k, v in BASE.items() if k != "head_dim"}, moe_num_experts=4, moe_k=2,
                         moe_intermediate_size=32, moe_num_shared_experts=2, moe_layer_start_index=1),
    "hunyuan_v1_moe": dict(BASE, num_experts=4, moe_topk=2, rope_parameters={"rope_type": "dynamic", "alpha": 1000.0,
                                                                             "factor": 1.0, "rope_theta": 10000.0}),
}
ARCH = {"seed_oss_out_bias": "seed_oss"}


def _checkpoint(case: str, path: Path):  # type: ignore[no-untyped-def]
    model = hf_model(ARCH.get(case, case), seed=1, **FIXED[case])
    return model, save(model, path)


@pytest.mark.parametrize("case", sorted(FIXED))
def test_cli_eval_matches_transformers(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, ckpt = _checkpoint(case, tmp_path / "ckpt")
    out = tmp_path / "logits.npy"
    rc = main(["eval", str(ckpt), "--tokens", ",".join(map(str, PROMPT)), "--decode", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    generated = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    ref = hf_logits(model, PROMPT + generated)
    assert rel_err(torch.from_numpy(np.load(out)), ref) < TOL
    assert generated == [int(r.argmax()) for r in ref[len(PROMPT) - 1:-1]]


PLACEMENTS = [  # (pipeline, devices, ts): uneven ratios over 2-4 CPU devices
    (("place_layer", "insert_transfers"), 2, (3.0, 1.0)),
    (("place_layer", "insert_transfers"), 3, (1.0, 2.0, 1.0)),
    (("place_graph", "insert_transfers"), 2, (3.0, 1.0)),
    (("place_graph", "insert_transfers"), 3, (2.0, 1.0, 1.0)),
    (("place_graph", "insert_transfers", "merge_qkv", "merge_up_gate"), 4, (1.0, 1.0, 1.0, 2.0)),
    # the CUDA backend's default passes after graph split
    (("place_graph", "insert_transfers", "fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate",
      "contiguous_heads", "fuse_delta_net_gates"), 2, (1.0, 2.0)),
]


def _pid(p: object) -> str:
    return "+".join(map(str, p)) if isinstance(p, tuple) else str(p)


@pytest.mark.parametrize("pipeline,n,ts", PLACEMENTS, ids=_pid)
@pytest.mark.parametrize("case", sorted(FIXED))
def test_placed_matches_transformers(case: str, pipeline: tuple[str, ...], n: int, ts: tuple[float, ...],
                                     tmp_path: Path) -> None:
    model, ckpt = _checkpoint(case, tmp_path / "ckpt")
    src = load_source(ckpt)
    devs = tuple(f"cpu:{k}" for k in range(n))
    pctx = PassContext(cfg=src.cfg, devices=devs, ts=ts)
    s = Session(src, None, "cpu:0", 32, transform=lambda g: run_pipeline(g, pipeline, pctx).graph)
    logits, gen = greedy(s, PROMPT, 4)
    assert rel_err(logits, hf_logits(model, PROMPT + gen)) < TOL
    g = s.graphs["tg"]
    assert len(g.device_list()) >= 2
    if "place_graph" in pipeline:  # attention and FFN (or the experts' slices) split: two reduces per layer
        assert len(g.by_op(Op.ALL_REDUCE)) == 2 * src.cfg.n_layer
        if src.cfg.attn_temperature_beta:
            assert len(g.by_op(Op.ATTN_TEMP)) > src.cfg.n_layer  # the query temperature runs per device


@pytest.mark.parametrize("case", ["ernie4_5_moe", "hunyuan_v1_moe", "seed_oss"])
def test_cuda_default_passes_unplaced_match_transformers(case: str, tmp_path: Path) -> None:
    """One device with the CUDA backend's passes: the ungated shared experts are not folded
    (fold_shared_expert only takes Qwen's sigmoid-gated one), the merges keep the logits."""
    model, ckpt = _checkpoint(case, tmp_path / "ckpt")
    src = load_source(ckpt)
    pipe = ("fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate", "contiguous_heads")
    s = Session(src, None, "cpu:0", 32, transform=lambda g: run_pipeline(g, pipe, PassContext(cfg=src.cfg)).graph)
    logits, gen = greedy(s, PROMPT, 4)
    assert rel_err(logits, hf_logits(model, PROMPT + gen)) < TOL
    assert not any(n.attr.get("shared") for n in s.graphs["tg"].nodes if n.op == Op.MOE_TOPK)


# ---- GGUF -----------------------------------------------------------------------------------

def llama_cpp_tensors(cfg, ckpt: Path) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Graph-named tensors as llama.cpp's converter stores them (Q/K rows permuted for
    ggml's interleaved RoPE where the converter does so: mistral3 yes, seed_oss no)."""
    src = HFCheckpoint(ckpt, cfg)
    out = {}
    for name, info in reference_weights(cfg).items():
        t = src.get(info).to(torch.float32)
        if cfg.arch in PERMUTED_QK and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            t = permute_rope(t, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
        out[name] = t.numpy()
    return out


@pytest.mark.parametrize("case", sorted(FIXED))
def test_gguf_matches_transformers(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, ckpt = _checkpoint(case, tmp_path / "ckpt")
    cfg = load_source(ckpt).cfg
    path = tmp_path / "m.gguf"
    arrays = llama_cpp_tensors(cfg, ckpt)
    gguf_writer.write_gguf(path, cfg, types={k: "f32" for k in arrays}, arrays=arrays)
    src = load_source(path)
    ignored = {"name", "max_position_embeddings", "torch_dtype", "rope_scaling", "rope_theta"}
    assert src.kind == "gguf" and src.cfg.model_dump(exclude=ignored) == cfg.model_dump(exclude=ignored)
    assert src.cfg.rope_theta == pytest.approx(cfg.rope_theta, rel=1e-7)  # GGUF keeps it as f32
    got, want = (dict(build(c).by_op(Op.ROPE)[0].attr, theta=0) for c in (src.cfg, cfg))
    assert got == want
    out = tmp_path / "logits.npy"
    capsys.readouterr()
    rc = main(["eval", str(path), "--tokens", ",".join(map(str, PROMPT)), "--decode", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    gen = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    assert rel_err(torch.from_numpy(np.load(out)), hf_logits(model, PROMPT + gen)) < TOL


def test_gguf_metadata_keys() -> None:
    cfg = from_hf_dict(dict(FIXED["ministral3"], model_type="ministral3"))
    kv = dict(gguf_writer.metadata(cfg))
    assert kv["general.architecture"] == "mistral3"
    assert kv["mistral3.attention.temperature_scale"] == 0.3
    assert kv["mistral3.rope.scaling.yarn_log_multiplier"] == 1.0 and kv["mistral3.rope.scaling.type"] == "yarn"
    assert dict(gguf_writer.metadata(from_hf_dict(dict(BASE, model_type="seed_oss"))))["general.architecture"] == "seed_oss"
    ernie = dict(gguf_writer.metadata(from_hf_dict(dict(FIXED["ernie4_5_moe"], model_type="ernie4_5_moe"))))
    assert ernie["general.architecture"] == "ernie4_5-moe" and ernie["ernie4_5-moe.leading_dense_block_count"] == 1
    assert ernie["ernie4_5-moe.expert_shared_count"] == 2 and ernie["ernie4_5-moe.expert_shared_feed_forward_length"] == 64


def test_refused_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(FIXED["hunyuan_v1_moe"], model_type="hunyuan_v1_moe", use_cla=True)))
    assert main(["predict", str(cfg), "--hw", "2xH200"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use_cla" in err and "Traceback" not in err


# ---- node counts and predict ----------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(FIXED))
@pytest.mark.parametrize("split,n", [(None, 1), ("layer", 3), ("graph", 2), ("graph", 3)])
def test_estimate_bounds_the_built_graph(case: str, split: str | None, n: int) -> None:
    cfg = from_hf_dict(dict(FIXED[case], model_type=ARCH.get(case, case)))
    devs = tuple(f"cuda:{k}" for k in range(n))
    for phase in ("pp", "tg"):
        opts = BuildOptions(phase=phase)  # type: ignore[arg-type]
        pipe = (f"place_{split}",) if split else ()
        g = run_pipeline(build(cfg, opts), pipe, PassContext(cfg=cfg, devices=devs)).graph
        est = estimate_nodes(cfg, opts, split=split, devices=devs)
        assert est.exact == count_nodes(g).total and est.budget <= 1.05 * est.exact


PRESETS = ["seed-oss-36b", "devstral-2-123b", "mistral-large-2407", "ernie-4.5-21b-a3b", "hunyuan-a13b"]


@pytest.mark.parametrize("hw", ["2x3090", "4x3090", "2xH200"])
@pytest.mark.parametrize("name", PRESETS)
def test_predict_runs_for_every_preset(name: str, hw: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", name, "--hw", hw, "--split", "layer,graph", "--quant", "Q4_K_M", "--ctx", "4096",
            "--ubatch", "512", "--tg", "32"]
    rc = main(args)
    err = capsys.readouterr().err
    if rc == 2:  # too large for the rig: one clean line, then the same run allowed to overflow
        assert "does not fit" in err and len(err.strip().splitlines()) == 1, err
        rc = main(args + ["--allow-overflow"])
        err = capsys.readouterr().err
    assert rc == 0, err
