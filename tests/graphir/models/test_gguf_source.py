"""GGUF sources: small files written with gguf.GGUFWriter are the oracle.

Each file carries llama.cpp's metadata keys and a tensor table named and shaped the way
llama.cpp names them (written out here by hand, not taken from graphir's builders), in mixed
storage types. Reading it must give the same ModelConfig as the equivalent config.json, the
same graph up to weight types, and weight leaves in exactly the file's types.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import quantize

from cli.main import main
from graphir.models.sources import weight_scheme
from graphir.dtypes import from_ggml
from graphir.graph import verify
from graphir.models import BuildOptions, ConfigError, build, from_hf_dict
from graphir.models.gguf_source import tensor_shapes
from graphir.models.sources import load_source
from graphir.ops import Op

GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "qwen3_next": "qwen3next"}

LLAMA = dict(model_type="llama", vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
             max_position_embeddings=8192, tie_word_embeddings=False, attention_bias=False)
# tied embeddings, q/k/v/o biases, head_dim != hidden/heads, vocab only from the tokenizer list
LLAMA_TIED = dict(LLAMA, tie_word_embeddings=True, attention_bias=True, head_dim=32, num_attention_heads=4,
                  num_key_value_heads=4, rms_norm_eps=1e-6)
QWEN3 = dict(model_type="qwen3", vocab_size=384, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
             max_position_embeddings=40960, tie_word_embeddings=True)
QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=320, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, max_position_embeddings=32768, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=128, norm_topk_prob=True)
QWEN3_NEXT = dict(model_type="qwen3_next", vocab_size=320, hidden_size=256, intermediate_size=512,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  rms_norm_eps=1e-6, rope_theta=10000000.0, partial_rotary_factor=0.25,
                  max_position_embeddings=262144, full_attention_interval=2, linear_conv_kernel_dim=4,
                  linear_key_head_dim=32, linear_value_head_dim=64, linear_num_key_heads=2,
                  linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                  shared_expert_intermediate_size=64, norm_topk_prob=True)
CASES = {"llama": LLAMA, "llama_tied_bias": LLAMA_TIED, "qwen3": QWEN3, "qwen3_moe": QWEN3_MOE,
         "qwen3_next": QWEN3_NEXT}


def gguf_tensors(d: dict) -> list[tuple[str, tuple[int, ...]]]:
    """llama.cpp's tensor table for a config, shapes in torch order ([out, in])."""
    H, V, L = d["hidden_size"], d["vocab_size"], d["num_hidden_layers"]
    hq, hkv, hd = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    mt = d["model_type"]
    out = [("token_embd.weight", (V, H)), ("output_norm.weight", (H,))]
    if not d.get("tie_word_embeddings"):
        out.append(("output.weight", (V, H)))
    for i in range(L):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", (H,)))
        linear = mt == "qwen3_next" and (i + 1) % d["full_attention_interval"] != 0
        if linear:
            nk, nv = d["linear_num_key_heads"], d["linear_num_value_heads"]
            dk, dv, K = d["linear_key_head_dim"], d["linear_value_head_dim"], d["linear_conv_kernel_dim"]
            out += [(p + "ssm_in.weight", (2 * nk * dk + 2 * nv * dv, H)), (p + "ssm_ba.weight", (2 * nv, H)),
                    (p + "ssm_conv1d.weight", (2 * nk * dk + nv * dv, K)), (p + "ssm_dt.bias", (nv,)),
                    (p + "ssm_a", (nv,)), (p + "ssm_norm.weight", (dv,)), (p + "ssm_out.weight", (H, nv * dv))]
        else:
            q_rows = hq * hd * (2 if mt == "qwen3_next" else 1)
            out += [(p + "attn_q.weight", (q_rows, H)), (p + "attn_k.weight", (hkv * hd, H)),
                    (p + "attn_v.weight", (hkv * hd, H)), (p + "attn_output.weight", (H, hq * hd))]
            if d.get("attention_bias"):
                out += [(p + "attn_q.bias", (q_rows,)), (p + "attn_k.bias", (hkv * hd,)),
                        (p + "attn_v.bias", (hkv * hd,)), (p + "attn_output.bias", (H,))]
            if mt != "llama":
                out += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
        out.append((p + ("post_attention_norm.weight" if mt == "qwen3_next" else "ffn_norm.weight"), (H,)))
        if mt in ("qwen3_moe", "qwen3_next"):
            E, N = d["num_experts"], d["moe_intermediate_size"]
            out += [(p + "ffn_gate_inp.weight", (E, H)), (p + "ffn_gate_exps.weight", (E, N, H)),
                    (p + "ffn_up_exps.weight", (E, N, H)), (p + "ffn_down_exps.weight", (E, H, N))]
            S = d.get("shared_expert_intermediate_size", 0)
            if S:
                out += [(p + "ffn_gate_inp_shexp.weight", (1, H)), (p + "ffn_gate_shexp.weight", (S, H)),
                        (p + "ffn_up_shexp.weight", (S, H)), (p + "ffn_down_shexp.weight", (H, S))]
        else:
            F = d["intermediate_size"]
            out += [(p + "ffn_gate.weight", (F, H)), (p + "ffn_up.weight", (F, H)), (p + "ffn_down.weight", (H, F))]
    return out


def storage_type(name: str, shape: tuple[int, ...]) -> Q:
    """A mixed table as llama-quantize would write one: f32 vectors, K-quants, q8_0, f16."""
    if len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")):
        return Q.F32
    if name.startswith("token_embd."):
        return Q.Q8_0
    if name.startswith("output.") or name.endswith("attn_v.weight"):
        return Q.Q6_K
    if name.endswith(("attn_q.weight", "attn_k.weight", "ssm_in.weight", "ffn_gate.weight", "ffn_up.weight",
                      "ffn_gate_shexp.weight", "ffn_up_shexp.weight")):
        return Q.Q4_K
    if name.endswith(("attn_output.weight", "ssm_out.weight", "ssm_ba.weight")):
        return Q.F16
    if name.endswith("_exps.weight") and "down" not in name:
        return Q.Q4_0
    return Q.Q8_0  # ffn_down, ffn_down_exps, ffn_down_shexp


def _tensor_data(shape: tuple[int, ...], qt: Q, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    if qt == Q.F32:
        return x
    if qt == Q.F16:
        return x.astype(np.float16)
    try:
        return quantize(x, qt)
    except NotImplementedError:
        # gguf's numpy code cannot quantise K-quants; the reader never looks at the bytes anyway
        block, size = GGML_QUANT_SIZES[qt]
        assert shape[-1] % block == 0
        return rng.integers(0, 256, size=shape[:-1] + (shape[-1] // block * size,), dtype=np.uint8)


def write_gguf(path: Path, d: dict, *, tokens: int | None = None, merges: int = 0, vocab_key: bool = True,
               norm_key: bool = False, seed: int = 0) -> dict[str, Q]:
    """Write a GGUF for config dict `d`; returns the file's tensor types by name."""
    arch = GGUF_ARCH[d["model_type"]]
    w = GGUFWriter(str(path), arch)
    u32 = lambda k, v: w.add_uint32(f"{arch}.{k}", int(v))  # noqa: E731
    f32 = lambda k, v: w.add_float32(f"{arch}.{k}", float(v))  # noqa: E731
    u32("block_count", d["num_hidden_layers"])
    u32("context_length", d["max_position_embeddings"])
    u32("embedding_length", d["hidden_size"])
    u32("feed_forward_length", d["intermediate_size"])
    u32("attention.head_count", d["num_attention_heads"])
    u32("attention.head_count_kv", d["num_key_value_heads"])
    u32("attention.key_length", d["head_dim"])
    u32("attention.value_length", d["head_dim"])
    f32("attention.layer_norm_rms_epsilon", d["rms_norm_eps"])
    f32("rope.freq_base", d["rope_theta"])
    u32("rope.dimension_count", int(d["head_dim"] * d.get("partial_rotary_factor", 1.0)))
    if vocab_key:
        u32("vocab_size", d["vocab_size"])
    if arch in ("qwen3moe", "qwen3next"):
        u32("expert_count", d["num_experts"])
        u32("expert_used_count", d["num_experts_per_tok"])
        u32("expert_feed_forward_length", d["moe_intermediate_size"])
        if d.get("shared_expert_intermediate_size"):
            u32("expert_shared_feed_forward_length", d["shared_expert_intermediate_size"])
        if norm_key:
            w.add_bool(f"{arch}.expert_weights_norm", bool(d["norm_topk_prob"]))
    if arch == "qwen3next":
        u32("full_attention_interval", d["full_attention_interval"])
        u32("ssm.conv_kernel", d["linear_conv_kernel_dim"])
        u32("ssm.state_size", d["linear_key_head_dim"])
        u32("ssm.group_count", d["linear_num_key_heads"])
        u32("ssm.time_step_rank", d["linear_num_value_heads"])
        u32("ssm.inner_size", d["linear_num_value_heads"] * d["linear_value_head_dim"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    n_tok = d["vocab_size"] if tokens is None else tokens
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(n_tok)])
    w.add_array("tokenizer.ggml.token_type", [1] * n_tok)
    if merges:
        w.add_array("tokenizer.ggml.merges", [f"a{i} b{i}" for i in range(merges)])
    rng = np.random.default_rng(seed)
    types: dict[str, Q] = {}
    for name, shape in gguf_tensors(d):
        qt = storage_type(name, shape)
        data = _tensor_data(shape, qt, rng)
        w.add_tensor(name, data, raw_dtype=qt if data.dtype == np.uint8 else None)
        types[name] = qt
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Q]]]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for key, d in CASES.items():
        path = root / f"{key}.gguf"
        out[key] = (path, write_gguf(path, d, vocab_key=key != "llama_tied_bias"))
    return out


def _hf_cfg(key: str, path: Path):
    return from_hf_dict(CASES[key], name=path.stem)


@pytest.mark.parametrize("key", list(CASES))
def test_config_matches_config_json(files, key):
    path, _ = files[key]
    src = load_source(path)
    assert src.kind == "gguf" and src.path == path
    assert src.cfg == _hf_cfg(key, path)


@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_graph_matches_config_json_and_carries_file_types(files, key, phase):
    path, types = files[key]
    src = load_source(path)
    g_file = build(src.cfg, BuildOptions(phase=phase, quant=weight_scheme(src, None)))
    g_json = build(_hf_cfg(key, path), BuildOptions(phase=phase))
    verify(g_file)
    assert len(g_file) == len(g_json)
    for a, b in zip(g_file.nodes, g_json.nodes):
        assert (a.name, a.op, a.inputs, a.attrs, a.device, a.spec.shape) == \
               (b.name, b.op, b.inputs, b.attrs, b.device, b.spec.shape)
        if a.op != Op.WEIGHT:
            assert a.spec.dtype == b.spec.dtype, a.name
    weights = {n.name: n for n in g_file.nodes if n.op == Op.WEIGHT}
    # the graph uses every tensor of the file, under the file's names, shapes and types
    assert sorted(weights) == sorted(types)
    shapes = tensor_shapes(path)
    for name, n in weights.items():
        assert n.spec.shape == shapes[name], name
        assert n.spec.dtype == from_ggml(int(types[name])), name
    assert {n.spec.dtype.name for n in weights.values()} >= {"f32", "q8_0", "q6_k"}
    assert g_file.info["quant"] == "gguf"


def test_tensor_types_listed(files):
    path, types = files["qwen3_next"]
    src = load_source(path)
    assert dict(src.tensor_types) == {k: from_ggml(int(v)) for k, v in types.items()}
    assert src.has_weights


def test_gguf_magic_without_suffix(files, tmp_path):
    path, _ = files["qwen3"]
    other = tmp_path / "model.bin"
    other.write_bytes(path.read_bytes())
    assert load_source(other).cfg == _hf_cfg("qwen3", path).model_copy(update={"name": "model"})


def test_norm_topk_prob_default_follows_llama_cpp(tmp_path):
    # llama.cpp's qwen3moe graph always normalises the top-k weights, key or no key
    p = tmp_path / "moe.gguf"
    write_gguf(p, QWEN3_MOE)
    assert load_source(p).cfg.norm_topk_prob is True
    p2 = tmp_path / "moe_off.gguf"
    write_gguf(p2, dict(QWEN3_MOE, norm_topk_prob=False), norm_key=True)
    assert load_source(p2).cfg.norm_topk_prob is False


def test_float32_metadata_reads_as_the_written_decimal(files):
    # GGUF stores eps as float32; 1e-5 must not come back as 9.999999747378752e-06
    assert load_source(files["llama"][0]).cfg.rms_norm_eps == 1e-5
    assert load_source(files["qwen3_next"][0]).cfg.rope_theta == 10000000.0


def test_read_is_fast_with_a_real_sized_tokenizer(tmp_path):
    # a real Qwen3 tokenizer: 151,936 tokens and 151,387 merges in the header
    p = tmp_path / "big_vocab.gguf"
    d = dict(QWEN3_NEXT, vocab_size=151936)
    d_small = dict(d, vocab_size=256)  # keep the embedding tables tiny; vocab comes from the key
    write_gguf(p, d_small, tokens=151936, merges=151387)
    t0 = time.perf_counter()
    src = load_source(p)
    elapsed = time.perf_counter() - t0
    assert src.cfg.vocab_size == 256
    assert elapsed < 1.0, f"reading the header took {elapsed:.2f} s"


def test_vocab_from_tokenizer_when_key_absent(files):
    path, _ = files["llama_tied_bias"]
    assert load_source(path).cfg.vocab_size == LLAMA_TIED["vocab_size"]


def _data_start(path: Path) -> int:
    """Where tensor data begins, per the gguf package's own reader (an independent parser)."""
    from gguf import GGUFReader

    return int(GGUFReader(str(path), "r").data_offset)


@pytest.mark.parametrize("where", ["data_middle", "data_end", "header_kv", "header_tensors", "magic", "empty"])
def test_truncated_file_is_one_line_config_error(files, tmp_path, capsys, where):
    path, _ = files["qwen3_next"]
    blob = path.read_bytes()
    start = _data_start(path)
    cut = {"data_middle": start + (len(blob) - start) // 2, "data_end": len(blob) - 1, "header_kv": 200,
           "header_tensors": start - 40, "magic": 3, "empty": 0}[where]
    bad = tmp_path / f"cut_{where}.gguf"
    bad.write_bytes(blob[:cut])
    with pytest.raises(ConfigError) as ei:
        load_source(bad)
    msg = str(ei.value)
    assert "\n" not in msg and str(bad) in msg
    capsys.readouterr()
    assert main(["lower", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(p), "gpt2")
    w.add_uint32("gpt2.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'"):
        load_source(p)


def test_missing_metadata_is_named(tmp_path):
    p = tmp_path / "bare.gguf"
    w = GGUFWriter(str(p), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="lacks .*hidden_size"):
        load_source(p)
