"""Read a GGUF file as a model source: hyper-parameters from its metadata, storage types from its
tensor table. Only the header is parsed (graphir.models.gguf_header: tensor data is never
touched but for Gemma 4's few RoPE frequency factors, long arrays such as the tokenizer are skipped), so an 80 GB file lowers in
milliseconds, and files holding ik_llama.cpp's own quant types read like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from graphir.dtypes import DType
from graphir.models.config import ConfigError, ModelConfig, from_hf_dict
from graphir.models.gguf_header import read_header

# GGUF general.architecture -> config.json model_type
GGUF_ARCHES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "qwen3next": "qwen3_next",
               "seed_oss": "seed_oss", "mistral3": "ministral3", "ernie4_5-moe": "ernie4_5_moe",
               "hunyuan-moe": "hunyuan_v1_moe", "glm4moe": "glm4_moe", "minimax-m2": "minimax_m2",
               "deepseek2": "deepseek_v3", "gpt-oss": "gpt_oss", "gemma3": "gemma3_text", "gemma4": "gemma4_text",
               "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}
# architectures (ours) whose GGUF Q/K rows pair RoPE dims interleaved (ggml's "norm" RoPE): the
# converter permutes llama's and mistral3's, ERNIE's come so from transformers
PERMUTED_QK = frozenset({"llama", "ministral3", "ernie4_5_moe"})
SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def read_gguf(path: Path) -> tuple[ModelConfig, tuple[tuple[str, DType], ...]]:
    """A GGUF's model config (from its metadata) and its tensor table (name, storage type);
    `graphir.models.sources.load_source` makes the ModelSource of them."""
    header = read_header(path)
    meta = header.metadata
    tensors: dict[str, tuple[tuple[int, ...], DType]] = {t.name: (t.shape, t.dtype) for t in header.tensors}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHES:
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHES)}")

    def k(name: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{name}")
        return default if v is None else v

    n_head = k("attention.head_count")
    n_embd = k("embedding_length")
    vocab = k("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else tensors.get("token_embd.weight", ((0, 0), None))[0][0]
    if isinstance(n_head, list):  # per-layer head counts: graphir needs them uniform
        if len(set(n_head)) != 1:
            raise ConfigError(f"{path}: per-layer head counts differ ({sorted(set(n_head))}); not supported")
        n_head = n_head[0]
    head_dim = k("attention.key_length", (n_embd // n_head) if n_embd and n_head else None)
    d: dict[str, Any] = {
        "model_type": GGUF_ARCHES[arch], "vocab_size": vocab, "hidden_size": n_embd,
        "num_hidden_layers": k("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": k("attention.head_count_kv", n_head), "head_dim": head_dim,
        "intermediate_size": k("feed_forward_length", 0) or k("expert_feed_forward_length", 0),
        "rms_norm_eps": k("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": k("rope.freq_base", 10000.0),
        "max_position_embeddings": k("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        # no metadata key says so: the tensor table does
        "attention_bias": any(n.startswith("blk.") and n.endswith(".attn_q.bias") for n in tensors),
    }
    n_rot = k("rope.dimension_count")
    if n_rot and head_dim and n_rot != head_dim and arch != "deepseek2":  # MLA: only the rope part rotates
        d["partial_rotary_factor"] = n_rot / head_dim
    scaling = k("rope.scaling.type")
    if scaling and scaling != "none":
        d["rope_scaling"] = {"rope_type": scaling, "factor": k("rope.scaling.factor", 1.0)}
        if k("rope.scaling.original_context_length") is not None:  # YaRN's; linear scaling has none
            d["rope_scaling"]["original_max_position_embeddings"] = k("rope.scaling.original_context_length")
        if scaling == "yarn":
            betas = {"beta_fast": k("rope.scaling.yarn_beta_fast"), "beta_slow": k("rope.scaling.yarn_beta_slow")}
            d["rope_scaling"].update({b: v for b, v in betas.items() if v is not None})  # absent: the YaRN defaults
    if arch == "mistral3":
        # llama.cpp keeps transformers' mscale_all_dim as yarn_log_multiplier (mscale is 1) and
        # llama_4_scaling_beta as attention.temperature_scale
        log_mul, temp = k("rope.scaling.yarn_log_multiplier"), k("attention.temperature_scale")
        sc = d.setdefault("rope_scaling", {})
        if log_mul:
            sc.update(mscale=1.0, mscale_all_dim=log_mul)
        if temp:
            sc["llama_4_scaling_beta"] = temp
    if arch == "seed_oss":
        d["attention_out_bias"] = any(n.startswith("blk.") and n.endswith(".attn_output.bias") for n in tensors)
    if arch in ("qwen3moe", "qwen3next", "qwen35moe"):
        d.update(num_experts=k("expert_count", 0), num_experts_per_tok=k("expert_used_count", 0),
                 moe_intermediate_size=k("expert_feed_forward_length", 0),
                 shared_expert_intermediate_size=k("expert_shared_feed_forward_length", 0),
                 norm_topk_prob=bool(k("expert_weights_norm", True)))  # llama.cpp always normalises here
    if arch == "ernie4_5-moe":
        n_ff, shexp = k("expert_feed_forward_length", 0), k("expert_shared_feed_forward_length", 0)
        d.update(moe_num_experts=k("expert_count", 0), moe_k=k("expert_used_count", 0), moe_intermediate_size=n_ff,
                 moe_layer_interval=k("interleave_moe_layer_step", 1),
                 moe_layer_start_index=k("leading_dense_block_count", 0), moe_layer_end_index=-1,
                 moe_num_shared_experts=shexp // n_ff if n_ff else 0)
    if arch == "hunyuan-moe":  # rope.freq_base already holds the NTK-alpha-stretched base
        n_ff = d["intermediate_size"]
        d.update(num_experts=k("expert_count", 0), moe_topk=k("expert_used_count", 0),
                 moe_intermediate_size=k("expert_feed_forward_length", n_ff),
                 num_shared_expert=k("expert_shared_feed_forward_length", n_ff) // n_ff if n_ff else 0)
    if arch in ("glm4moe", "minimax-m2", "deepseek2"):
        d.update(_sigmoid_moe(path, arch, k, tensors))
    if arch == "deepseek2":
        d.update(_mla(k, d))
    if arch == "gpt-oss":
        # llama.cpp: even layers slide (pattern 2), clamp 7 and alpha 1.702 are built in, the
        # YaRN ramp is gpt-oss's (betas 32 / 1, untruncated); biases and sinks are in the tensor table
        d.update(num_local_experts=k("expert_count", 0), num_experts_per_tok=k("expert_used_count", 0),
                 intermediate_size=k("expert_feed_forward_length", 0), sliding_window=k("attention.sliding_window"),
                 attention_bias=True)
        if "rope_scaling" in d:
            d["rope_scaling"].update(beta_fast=32.0, beta_slow=1.0, truncate=False)
    if arch == "gemma3":
        # llama.cpp's constants: every 6th layer global, local RoPE base 10000, and the attention
        # scale 1/sqrt(n_embd / n_head) for the 62-layer 27B (its query_pre_attn_scalar), else 1/sqrt(head_dim)
        d.update(sliding_window=k("attention.sliding_window"), sliding_window_pattern=6, rope_local_base_freq=10000.0,
                 query_pre_attn_scalar=(n_embd // n_head) if d["num_hidden_layers"] == 62 else head_dim)
    if arch == "gemma4":
        d.update(_gemma4(path, header, k, tensors, d))
    if arch in ("qwen3next", "qwen35", "qwen35moe"):
        nv = k("ssm.time_step_rank")
        d.update(full_attention_interval=k("full_attention_interval", 4), linear_conv_kernel_dim=k("ssm.conv_kernel"),
                 linear_key_head_dim=k("ssm.state_size"), linear_num_key_heads=k("ssm.group_count"),
                 linear_num_value_heads=nv,
                 linear_value_head_dim=(k("ssm.inner_size", 0) // nv) if nv else None)
    missing = [key for key, v in d.items() if v is None]
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)} for {arch}")
    cfg = from_hf_dict(d, name=path.stem)
    types = tuple((name, dt) for name, (_, dt) in tensors.items())
    return cfg, types


def _gemma4(path: Path, header: Any, k: Any, tensors: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    """config.json keys of gemma4 from llama.cpp's metadata: the full layers' head size in
    key_length (the sliding ones' in key_length_swa), KV heads per layer, the layer pattern as
    booleans; values shared with the keys where a full layer has no attn_v; proportional RoPE
    read off rope_freqs (1 for the pairs that turn, 1e30 for the rest)."""
    swa = k("attention.sliding_window_pattern")
    n = d["num_hidden_layers"]
    if not isinstance(swa, list) or len(swa) != n:
        raise ConfigError(f"{path}: gemma4.attention.sliding_window_pattern must list {n} layers")
    kvs = k("attention.head_count_kv")
    kvs = kvs if isinstance(kvs, list) else [kvs] * n
    full = [i for i in range(n) if not swa[i]]
    head_full = k("attention.key_length")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": k("rope.freq_base", 10000.0)}
    t = next((x for x in header.tensors if x.name == "rope_freqs.weight"), None)
    if t is not None:
        if t.dtype.name != "f32" or len(t.shape) != 1:
            raise ConfigError(f"{path}: rope_freqs.weight must be an f32 vector, got {t.dtype.name} {list(t.shape)}")
        with open(path, "rb") as f:  # a few hundred f32: the factors themselves carry the rotary share
            f.seek(header.data_start + t.offset)
            factors = np.frombuffer(f.read(4 * int(np.prod(t.shape))), "<f4")
        rope = {**rope, "rope_type": "proportional", "partial_rotary_factor": 2 * int((factors == 1.0).sum()) / head_full}
    return {"head_dim": k("attention.key_length_swa"), "global_head_dim": head_full,
            "num_key_value_heads": kvs[swa.index(True)] if True in swa else kvs[0],
            "per_layer_config": {str(i): {"head_dim": head_full, "num_key_value_heads": kvs[i]} for i in full},
            "attention_k_eq_v": bool(full) and all(f"blk.{i}.attn_v.weight" not in tensors for i in full),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
            "sliding_window": k("attention.sliding_window"), "final_logit_softcapping": k("final_logit_softcapping", 0.0),
            "hidden_size_per_layer_input": k("embedding_length_per_layer_input", 0),
            "num_kv_shared_layers": k("attention.shared_kv_layers", 0),
            "rope_parameters": {"full_attention": rope,
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": k("rope.freq_base_swa", 10000.0)}}}


def _sigmoid_moe(path: Path, arch: str, k: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """config.json keys of the sigmoid-routed families from llama.cpp's metadata. glm4moe's
    block_count includes its multi-token-prediction layers (nextn_predict_layers), which the
    decoder does not run; its shared expert is expert_shared_count experts wide."""
    gating = k("expert_gating_func", SIGMOID_GATING)
    if gating != SIGMOID_GATING:
        raise ConfigError(f"{path}: {arch}.expert_gating_func={gating}; only sigmoid gating "
                          f"({SIGMOID_GATING}) is supported")
    d: dict[str, Any] = {"num_experts_per_tok": k("expert_used_count")}
    if arch == "minimax-m2":
        return {**d, "num_local_experts": k("expert_count"), "intermediate_size": k("expert_feed_forward_length")}
    blocks, nextn = k("block_count"), k("nextn_predict_layers", 0) if arch == "glm4moe" else 0
    return {**d, "num_hidden_layers": blocks - nextn if blocks is not None else None,
            "n_routed_experts": k("expert_count"), "moe_intermediate_size": k("expert_feed_forward_length"),
            "n_shared_experts": k("expert_shared_count", 0), "first_k_dense_replace": k("leading_dense_block_count", 0),
            "routed_scaling_factor": float(k("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(k("expert_weights_norm", False)),
            "n_group": k("expert_group_count", 1), "topk_group": k("expert_group_used_count", 1),
            "use_qk_norm": any(n.endswith(".attn_q_norm.weight") for n in tensors)}


def _mla(k: Any, d: dict[str, Any]) -> dict[str, Any]:
    """deepseek2's attention keys: key_length is nope + rope, rope.dimension_count the rope part;
    the file keeps the checkpoint's interleaved rotary rows. YaRN's mscale_all_dim travels as
    yarn_log_multiplier = 0.1 * mscale_all_dim (llama.cpp assumes mscale equal to it)."""
    rope, key = k("rope.dimension_count"), k("attention.key_length")
    out: dict[str, Any] = {"q_lora_rank": k("attention.q_lora_rank"), "kv_lora_rank": k("attention.kv_lora_rank"),
                           "qk_rope_head_dim": rope, "qk_nope_head_dim": key - rope if key and rope else None,
                           "v_head_dim": k("attention.value_length"), "rope_interleave": True, "head_dim": rope}
    mul = k("rope.scaling.yarn_log_multiplier")
    if "rope_scaling" in d and mul:
        m = round(float(mul) / 0.1, 6)
        out["rope_scaling"] = {**d["rope_scaling"], "mscale": m, "mscale_all_dim": m}
    return out


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes (torch order) from a GGUF file's table."""
    return {t.name: t.shape for t in read_header(path).tensors}
