"""Qwen3.5 (dense `qwen3_5` and MoE `qwen3_5_moe`) against transformers, the oracle.

Random tiny transformers models (Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM) are saved with
`save_pretrained`; graphir runs the checkpoint unplaced, layer split and graph split over 2-4
CPU devices with uneven ratios (the delta-net split by key-head groups, as ik_llama.cpp does for
Qwen3.5), prefill in two pieces plus greedy decode, and every logit row must equal
transformers' forward over the same tokens (f32: 1e-4 relative).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import hf_logits, hf_model, rel_err, save
from graphir.models import from_hf_dict
from graphir.ops import Op
from graphir.models.sources import load_source

passes = pytest.importorskip("passes")
TOL = 1e-4
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DENSE = dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=4, linear_value_head_dim=6, linear_conv_kernel_dim=4,
             layer_types=["linear_attention", "full_attention", "linear_attention"])
MOE = dict({k: v for k, v in DENSE.items() if k != "intermediate_size"}, num_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=10, shared_expert_intermediate_size=12)
FIXED = {"qwen3_5": DENSE, "qwen3_5_moe": MOE}
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]


@st.composite
def configs(draw: st.DrawFn, moe: bool) -> dict:
    kv = draw(st.integers(1, 2))
    nk = draw(st.integers(1, 3))
    n = draw(st.integers(2, 4))
    interval = draw(st.sampled_from([2, 3]))
    types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    types[-1] = "full_attention"  # transformers' cache needs one attention layer
    c = dict(vocab_size=37, hidden_size=draw(st.sampled_from([16, 24])), num_hidden_layers=n,
             num_attention_heads=kv * draw(st.integers(1, 2)), num_key_value_heads=kv,
             head_dim=draw(st.sampled_from([4, 8])), linear_num_key_heads=nk,
             linear_num_value_heads=nk * draw(st.integers(1, 3)), linear_key_head_dim=draw(st.sampled_from([4, 6])),
             linear_value_head_dim=draw(st.sampled_from([3, 5])), linear_conv_kernel_dim=draw(st.sampled_from([2, 4])),
             tie_word_embeddings=draw(st.booleans()), layer_types=types,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                              "mrope_section": [1, 1, 0], "mrope_interleaved": True})
    if moe:
        e = draw(st.integers(3, 5))
        c.update(num_experts=e, num_experts_per_tok=draw(st.integers(1, 2)), moe_intermediate_size=draw(st.sampled_from([6, 8])),
                 shared_expert_intermediate_size=draw(st.sampled_from([5, 8])))
    else:
        c["intermediate_size"] = draw(st.sampled_from([12, 20]))
    return c


def _check(arch: str, config: dict, path: Path, prompt: list[int], split: int, seed: int) -> None:
    model = hf_model(arch, seed=seed, **config)
    src = load_source(save(model, path))
    whole, gen = greedy(Session(src, None, "cpu", 32), prompt, 4)
    ref = hf_logits(model, prompt + gen)
    assert rel_err(whole, ref) < TOL, config
    s = Session(src, None, "cpu", 32)
    parts = [s.prefill(prompt[:split]), s.prefill(prompt[split:]), s.decode(gen)]
    assert rel_err(torch.cat(parts), ref) < TOL, (split, config)


@SETTINGS
@given(config=configs(moe=False), prompt=st.lists(st.integers(0, 36), min_size=7, max_size=10),
       split=st.integers(1, 6), seed=st.integers(0, 3))
def test_qwen3_5_matches_transformers(tmp_path_factory, config, prompt, split, seed) -> None:
    _check("qwen3_5", config, tmp_path_factory.mktemp("q35"), prompt, split, seed)


@SETTINGS
@given(config=configs(moe=True), prompt=st.lists(st.integers(0, 36), min_size=7, max_size=10),
       split=st.integers(1, 6), seed=st.integers(0, 3))
def test_qwen3_5_moe_matches_transformers(tmp_path_factory, config, prompt, split, seed) -> None:
    _check("qwen3_5_moe", config, tmp_path_factory.mktemp("q35m"), prompt, split, seed)


PLACEMENTS = [  # (devices, ts, pipeline, options)
    (2, (2, 1), ("place_layer", "insert_transfers"), {}),
    (3, (1, 2, 2), ("place_layer", "insert_transfers"), {}),
    (2, (3, 1), ("place_graph", "insert_transfers"), {"recurrent": "split"}),
    (2, (1, 1), ("place_graph", "insert_transfers"), {}),  # delta-net whole on one device
    (4, (2, 1, 1, 1), ("place_graph", "insert_transfers"), {"recurrent": "split"}),
    (4, (1, 3, 2, 2), ("place_graph", "insert_transfers", "merge_siblings", "merge_qkv", "merge_up_gate",
                       "contiguous_heads", "fuse_delta_net_gates"), {"recurrent": "split"}),
]


@pytest.mark.parametrize("n,ts,pipeline,options", PLACEMENTS,
                         ids=lambda p: "+".join(p) if isinstance(p, tuple) and isinstance(p[0], str) else str(p))
@pytest.mark.parametrize("arch", sorted(FIXED))
def test_placed_matches_transformers(arch: str, n: int, ts: tuple, pipeline: tuple, options: dict,
                                     tmp_path: Path) -> None:
    config = dict(FIXED[arch], linear_num_key_heads=4, linear_num_value_heads=8, num_attention_heads=8,
                  num_key_value_heads=4, num_hidden_layers=5, layer_types=["linear_attention", "full_attention"] * 2
                  + ["linear_attention"])
    model = hf_model(arch, seed=2, **config)
    src = load_source(save(model, tmp_path / "ckpt"))
    devs = tuple(f"cpu:{k}" for k in range(n))
    pctx = passes.PassContext(cfg=src.cfg, devices=devs, ts=tuple(float(t) for t in ts), **options)
    s = Session(src, None, "cpu:0", 32, transform=lambda g: passes.run_pipeline(g, pipeline, pctx).graph)
    _, gen = greedy(Session(src, None, "cpu", 32), PROMPT, 3)
    got = torch.cat([s.prefill(PROMPT[:4]), s.prefill(PROMPT[4:]), s.decode(gen)])
    assert rel_err(got, hf_logits(model, PROMPT + gen)) < TOL
    used = s.graphs["tg"].device_list()
    assert len(used) == n, used  # every device holds a part
    if "merge_siblings" in pipeline:  # the four delta-net projections became one matmul per device
        assert [x for x in s.graphs["tg"].nodes if ".ssm_in_qkvzba" in x.name and x.op.value == "matmul"]
    if options.get("recurrent") == "split" and "place_graph" in pipeline and "merge_siblings" not in pipeline:  # the delta-net's pieces on every device
        pieces = [s.weights[k] for k in s.weights if k.startswith("blk.0.attn_qkv.weight#")]
        assert len(pieces) >= 2 and sum(p.shape[0] for p in pieces) == src.cfg.conv_dim


CUDA_DEFAULT = ("fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate", "contiguous_heads",
                "fuse_delta_net_gates")  # graphir run's passes


@pytest.mark.parametrize("arch", sorted(FIXED))
def test_run_passes_match_transformers(arch: str, tmp_path: Path) -> None:
    model = hf_model(arch, seed=4, **FIXED[arch])
    src = load_source(save(model, tmp_path / "ckpt"))
    pctx = passes.PassContext(cfg=src.cfg, devices=("cpu",))
    s = Session(src, None, "cpu", 32, transform=lambda g: passes.run_pipeline(g, CUDA_DEFAULT, pctx).graph)
    _, gen = greedy(Session(src, None, "cpu", 32), PROMPT, 3)
    got = torch.cat([s.prefill(PROMPT[:4]), s.prefill(PROMPT[4:]), s.decode(gen)])
    assert rel_err(got, hf_logits(model, PROMPT + gen)) < TOL
    g = s.graphs["tg"]
    assert [n for n in g.nodes if n.name == "blk.0.ssm_in_qkvzba"]
    assert all(n.attr.get("raw_gates") for n in g.by_op(Op.DELTA_NET)) and g.by_op(Op.DELTA_NET)


def test_wrapped_config_reads_text_tower() -> None:
    """A Qwen3.5 config.json is a vision-language wrapper: the text tower is the model."""
    d = {"model_type": "qwen3_5_moe", "tie_word_embeddings": False, "vision_config": {"depth": 27, "hidden_size": 1152},
         "text_config": dict(MOE, model_type="qwen3_5_moe_text",
                             rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                              "mrope_section": [11, 11, 10], "mrope_interleaved": True})}
    cfg = from_hf_dict(d)
    assert cfg.arch == "qwen3_5_moe" and cfg.hidden_size == 24 and cfg.rope_theta == 1e7
    assert cfg.rope_scaling == () and cfg.n_rot == 2 and cfg.norm_topk_prob
    assert all(cfg.is_moe_layer(i) for i in range(cfg.n_layer)) and cfg.recurrent_layers == (0, 2)


# ---- GGUF as llama.cpp's converter lays it out ----------------------------------------------

def _llama_cpp_layout(cfg, ckpt: Path) -> dict:
    """Graph-named tensors as the converter stores them: zero-centred norms with the 1 added,
    value heads tiled."""
    from backends.cuda.weights.gguf_weights import v_head_order
    from backends.cuda.weights.hf_checkpoint import HFCheckpoint
    from backends.cuda.weights.sources import reference_weights

    src = HFCheckpoint(ckpt, cfg)
    out = {}
    for name, info in reference_weights(cfg).items():
        t = src.get(info).to(torch.float32)
        if info.norm_offset == 1.0:
            t = t + 1.0
        out[name] = v_head_order(t, cfg, name, to_gguf=True)
    return out


@pytest.mark.parametrize("arch", sorted(FIXED))
def test_gguf_matches_transformers(arch: str, tmp_path: Path) -> None:
    import numpy as np

    from graphir.models import gguf_writer
    from graphir.models.gguf_header import read_header

    model = hf_model(arch, seed=3, **FIXED[arch])
    st_src = load_source(save(model, tmp_path / "ckpt"))
    cfg = st_src.cfg
    tensors = _llama_cpp_layout(cfg, tmp_path / "ckpt")
    from backends.cuda.weights.gguf_weights import v_head_order
    z = tensors["blk.0.attn_gate.weight"]
    assert not torch.equal(z, v_head_order(z, cfg, "blk.0.attn_gate.weight", to_gguf=False))  # the order matters here
    arrays = {k: v.numpy() for k, v in tensors.items()}
    path = tmp_path / "m.gguf"
    gguf_writer.write_specs(path, cfg, gguf_writer.tensor_specs(cfg), types={k: "f32" for k in arrays}, arrays=arrays)
    meta = read_header(path).metadata
    gguf_arch = {"qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe"}[arch]
    assert meta["general.architecture"] == gguf_arch and meta[f"{gguf_arch}.ssm.group_count"] == 2
    assert len(meta[f"{gguf_arch}.rope.dimension_sections"]) == 4
    g_src = load_source(path)
    ignored = {"name", "max_position_embeddings", "torch_dtype"}
    assert g_src.kind == "gguf" and g_src.cfg.model_dump(exclude=ignored) == cfg.model_dump(exclude=ignored)
    _, gen = greedy(Session(st_src, None, "cpu", 32), PROMPT, 3)
    s = Session(g_src, None, "cpu", 32)
    got = torch.cat([s.prefill(PROMPT), s.decode(gen)])
    assert rel_err(got, hf_logits(model, PROMPT + gen)) < TOL
    assert np.isfinite(got.numpy()).all()


# ---- parameter counts against transformers (meta device) -------------------------------------

def _hf_params(d: dict) -> int:
    import warnings

    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(**d)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg).num_parameters()


def _graph_params(cfg) -> int:
    from graphir.models import BuildOptions, build
    from graphir.stats import graph_stats

    return graph_stats(build(cfg, BuildOptions(phase="tg"))).params_total


@settings(max_examples=15, deadline=None, derandomize=True)
@given(config=st.one_of(configs(moe=False), configs(moe=True)))
def test_random_config_params_match_transformers(config: dict) -> None:
    model_type = "qwen3_5_moe_text" if "num_experts" in config else "qwen3_5_text"
    d = dict(config, model_type=model_type)
    assert _graph_params(from_hf_dict(d)) == _hf_params(d)


# the text decoders of the published checkpoints (Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM:
# no vision tower, no MTP head), as transformers counts them
PRESET_PARAMS = {"qwen3.5-27b": 26_895_998_464, "qwen3.5-122b-a10b": 122_111_526_912,
                 "qwen3.5-397b-a17b": 396_346_350_336}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_preset_params_exact(name: str) -> None:
    import json
    from importlib import resources

    from graphir.models.sources import load_preset

    f = resources.files("graphir.data") / "presets" / f"{name}.json"
    d = {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}
    assert _graph_params(load_preset(name)) == _hf_params(d) == PRESET_PARAMS[name]


# ---- graphir predict on the rigs of the sweeps -----------------------------------------------

@pytest.mark.parametrize("mode", ["layer", "graph", "graph-split"])
@pytest.mark.parametrize("hw", ["2x3090", "4x3090", "2xH200"])
@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_predict_runs_on_every_rig(name: str, hw: str, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    split, _, rec = mode.partition("-")
    args = ["predict", name, "--hw", hw, "--split", split, "--quant", "IQ4_XS", "--ctx", "8192", "--ubatch", "512",
            "--format", "csv"] + (["--recurrent", rec] if rec else [])
    rc = main(args)
    out, err = capsys.readouterr()
    if rc != 0:  # too large for the rig: one clean line, then the overflow run goes on
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not fit" in err, err
        assert main(args + ["--allow-overflow"]) == 0
        out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r and not r.startswith("#")]
    assert len(rows) >= 2 and split in out  # a header and predicted rows


# ---- graphir eval and reduced precision --------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(FIXED))
def test_cli_eval_matches_transformers(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from cli.main import main

    model = hf_model(arch, seed=1, **FIXED[arch])
    ckpt = save(model, tmp_path / "ckpt")
    out = tmp_path / "logits.npy"
    rc = main(["eval", str(ckpt), "--tokens", ",".join(map(str, PROMPT)), "--decode", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    generated = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    ref = hf_logits(model, PROMPT + generated)
    assert rel_err(torch.from_numpy(np.load(out)), ref) < TOL
    assert generated == [int(r.argmax()) for r in ref[len(PROMPT) - 1:-1]]


@pytest.mark.parametrize("arch", sorted(FIXED))
def test_bf16_agrees_with_f32(arch: str, tmp_path: Path) -> None:
    """bf16 runs stay as close to the f32 run as transformers' own bf16 runs do, on average over
    three models (one model alone is noisy: a bf16 rounding can flip a near tie of the router)."""
    ours, theirs = [], []
    for seed in range(3):
        model = hf_model(arch, seed=seed, **FIXED[arch])
        src = load_source(save(model, tmp_path / f"ckpt{seed}"))
        ref, gen = greedy(Session(src, None, "cpu", 16, dtype="f32"), PROMPT, 3)
        theirs.append(rel_err(hf_logits(model.to(torch.bfloat16), PROMPT + gen), ref))
        s = Session(src, None, "cpu", 16, dtype="bf16")
        got = torch.cat([s.prefill(PROMPT), s.decode(gen)])
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        ours.append(rel_err(got, ref))
    assert sum(ours) / 3 < max(0.03, 1.5 * sum(theirs) / 3), (ours, theirs)


def test_delta_net_granules_follow_tiled_value_heads() -> None:
    """ik_llama.cpp cuts Qwen3.5's ssm_out per value head (dv columns, tiled in its files): with
    256-wide blocks and dv = 128, key heads go to devices in pairs, whatever the value heads per
    key head (3 for the 27B, 4 for the MoE models)."""
    from graphir.models.sources import load_preset
    from graphir.quant import scheme
    from passes.plan import plan_graph, type_from_scheme

    for name in ("qwen3.5-27b", "qwen3.5-122b-a10b"):
        cfg = load_preset(name)
        plan = plan_graph(cfg, ("cuda:0", "cuda:1", "cuda:2"), type_from_scheme(cfg, scheme("Q4_K_M")),
                          ts=(1.0, 1.0, 1.0), recurrent="split")
        for i, mixer, _ in plan.layers:
            if cfg.is_recurrent(i):
                ranges = [r for r in mixer.share("kheads").ranges if r]
                assert len(ranges) == 3 and all(a % 2 == 0 and b % 2 == 0 for a, b in ranges), (name, ranges)


@pytest.mark.parametrize("change,message", [
    ({"text_config": "qwen3_5_moe_text"}, "text_config must be a JSON object"),
    ({"num_experts": 0}, "every qwen3_5_moe layer is MoE"),
    ({"linear_num_value_heads": 5}, "not a multiple of linear_num_key_heads"),
    ({"layer_types": ["linear_attention"]}, "layer_types has 1 entries for 3 layers"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
])
def test_bad_configs_are_refused_in_one_line(change: dict, message: str) -> None:
    from graphir.models.config import ConfigError

    d = dict(MOE, model_type="qwen3_5_moe_text", **change)
    with pytest.raises(ConfigError, match=message) as e:
        from_hf_dict(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", sorted(FIXED))
def test_vision_language_checkpoint_runs_its_text_tower(arch: str, tmp_path: Path) -> None:
    """The published layout: Qwen3_5(Moe)ForConditionalGeneration, config.json with text_config and
    vision_config, decoder under model.language_model.*, a vision tower under model.visual.*
    (skipped). Logits of a text prompt equal the full model's."""
    import transformers

    from helpers.hf_oracle import perturb

    names = {"qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "qwen3_5_text"),
             "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe_text")}[arch]
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=FIXED[arch]["hidden_size"],
                  patch_size=4, spatial_merge_size=1, temporal_patch_size=2, num_position_embeddings=16)
    cfg = getattr(transformers, names[0])(text_config=dict(FIXED[arch], model_type=names[2]), vision_config=vision)
    torch.manual_seed(0)
    model = getattr(transformers, names[1])._from_config(cfg, attn_implementation="eager",
                                                         experts_implementation="eager").eval()
    perturb(model, zero_centred=True)
    src = load_source(save(model, tmp_path / "vlm"))
    assert src.cfg.arch == arch
    whole, gen = greedy(Session(src, None, "cpu", 32), PROMPT, 3)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([PROMPT + gen])).logits[0].float()
    assert rel_err(whole, ref) < TOL
