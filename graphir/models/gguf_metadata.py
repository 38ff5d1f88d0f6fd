"""GGUF metadata in llama.cpp's converter layout: the architecture names, the keys llama.cpp /
ik_llama.cpp read for each family, and the few tensors the converter adds that no graph node
reads (Gemma 4's rope_freqs). graphir.models.gguf_writer writes them beside the weights."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from graphir.models.config import ConfigError, ModelConfig

# config.json model_type -> GGUF general.architecture (the inverse of gguf_source.GGUF_ARCHES)
GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "qwen3_next": "qwen3next",
             "seed_oss": "seed_oss", "ministral3": "mistral3", "ernie4_5_moe": "ernie4_5-moe",
             "hunyuan_v1_moe": "hunyuan-moe", "glm4_moe": "glm4moe", "minimax_m2": "minimax-m2",
             "deepseek_v3": "deepseek2", "gpt_oss": "gpt-oss", "gemma3": "gemma3",
             "qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe", "gemma4": "gemma4"}
ALIGNMENT = 32


def metadata(cfg: ModelConfig, *, file_type: str = "f16") -> list[tuple[str, Any]]:
    """(key, value) pairs as llama.cpp's converter writes them; ints are u32, floats f32."""
    arch = GGUF_ARCH[cfg.arch]
    kv: list[tuple[str, Any]] = [("general.architecture", arch), ("general.name", cfg.name or arch),
                                 ("general.alignment", ALIGNMENT), ("general.file_type_name", file_type)]
    a = lambda key, v: kv.append((f"{arch}.{key}", v))  # noqa: E731
    a("block_count", cfg.n_layer)
    a("context_length", cfg.max_position_embeddings)
    a("embedding_length", cfg.hidden_size)
    a("feed_forward_length", cfg.intermediate_size)
    a("attention.head_count", cfg.n_head)
    a("attention.head_count_kv", cfg.n_kv_head)
    a("attention.key_length", cfg.head_dim)
    a("attention.value_length", cfg.head_dim)
    a("attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps))
    a("rope.freq_base", float(cfg.rope_theta))
    a("rope.dimension_count", cfg.n_rot)
    scaling = dict(cfg.rope_scaling)
    if scaling.get("rope_type") in ("linear", "yarn"):
        a("rope.scaling.type", scaling["rope_type"])
        a("rope.scaling.factor", float(scaling.get("factor", 1.0)))
        if scaling.get("original_max_position_embeddings"):
            a("rope.scaling.original_context_length", int(scaling["original_max_position_embeddings"]))
        for key in ("beta_fast", "beta_slow"):
            if scaling["rope_type"] == "yarn" and scaling.get(key):
                a(f"rope.scaling.yarn_{key}", float(scaling[key]))
    if cfg.arch == "ministral3":
        if scaling.get("mscale_all_dim"):
            a("rope.scaling.yarn_log_multiplier", float(scaling["mscale_all_dim"]))
        if cfg.attn_temperature_beta:
            a("attention.temperature_scale", float(cfg.attn_temperature_beta))
    a("vocab_size", cfg.vocab_size)
    if cfg.arch == "ernie4_5_moe":
        _ernie_layers(cfg, a)
    if cfg.is_moe:
        a("expert_count", cfg.n_expert)
        a("expert_used_count", cfg.n_expert_used)
        a("expert_feed_forward_length", cfg.moe_intermediate_size)
        if cfg.arch not in ("ernie4_5_moe", "hunyuan_v1_moe"):  # their converters write none (always normalised)
            a("expert_weights_norm", bool(cfg.norm_topk_prob))
        if cfg.shared_expert_intermediate_size and cfg.arch != "glm4_moe":
            a("expert_shared_feed_forward_length", cfg.shared_expert_intermediate_size)
    if cfg.sigmoid_router:
        a("expert_gating_func", 2)  # sigmoid
    if cfg.arch in ("glm4_moe", "deepseek_v3"):  # the keys llama.cpp's Glm4Moe / DeepseekV2 converters write
        a("expert_shared_count", cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size)
        a("leading_dense_block_count", len(cfg.mlp_only_layers))
        a("expert_weights_scale", float(cfg.routed_scaling_factor))
        if cfg.arch == "glm4_moe":
            a("nextn_predict_layers", 0)  # no multi-token-prediction layer in the file
        if cfg.n_group > 1:
            a("expert_group_count", cfg.n_group)
            a("expert_group_used_count", cfg.topk_group)
    if cfg.arch in ("gpt_oss", "gemma3"):  # the layer patterns (and gpt-oss's clamp) are llama.cpp's constants
        a("attention.sliding_window", cfg.sliding_window)
    if cfg.arch in ("qwen3_5", "qwen3_5_moe"):
        # multimodal RoPE sections [t, h, w, 0] (Qwen3.5: [11, 11, 10, 0]); ik_llama.cpp requires the key.
        # For text all streams carry the token index, so any split of the rotary pairs rotates alike
        half = cfg.n_rot // 2
        t = half * 11 // 32
        a("rope.dimension_sections", [t, t, half - 2 * t, 0])
    if cfg.is_hybrid:
        full = cfg.attention_layers
        a("full_attention_interval", (full[0] + 1) if full else cfg.n_layer + 1)
        a("ssm.conv_kernel", cfg.linear_conv_kernel_dim)
        a("ssm.state_size", cfg.linear_key_head_dim)
        a("ssm.group_count", cfg.linear_num_key_heads)
        a("ssm.time_step_rank", cfg.linear_num_value_heads)
        a("ssm.inner_size", cfg.linear_num_value_heads * cfg.linear_value_head_dim)
    if cfg.arch == "deepseek_v3":
        _mla_keys(cfg, kv, a)
    if cfg.arch == "gemma4":
        _gemma4_keys(cfg, kv, a)
    kv.append(("tokenizer.ggml.model", "none"))  # no vocabulary: {arch}.vocab_size gives the size
    return kv


def _ernie_layers(cfg: ModelConfig, a: Callable[[str, Any], None]) -> None:
    """llama.cpp's ERNIE 4.5 MoE layers: dense before leading_dense_block_count, then every
    interleave_moe_layer_step-th; no end index (a config whose MoE layers stop early has no GGUF)."""
    lead = next((i for i in range(cfg.n_layer) if i not in cfg.mlp_only_layers), cfg.n_layer)
    if tuple(range(lead)) != tuple(sorted(cfg.mlp_only_layers)):
        raise ConfigError("ERNIE 4.5 GGUF metadata cannot express MoE layers that end before the last layer")
    a("leading_dense_block_count", lead)
    a("interleave_moe_layer_step", cfg.decoder_sparse_step)
    a("expert_shared_count", cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size)


def _mla_keys(cfg: ModelConfig, kv: list[tuple[str, Any]], a: Callable[[str, Any], None]) -> None:
    """deepseek2's attention keys (replacing the generic key_length / value_length)."""
    arch = GGUF_ARCH[cfg.arch]
    sizes = {"attention.key_length": cfg.qk_nope_head_dim + cfg.head_dim, "attention.value_length": cfg.v_head_dim}
    kv[:] = [(k, sizes.get(k.removeprefix(f"{arch}."), v)) for k, v in kv]
    if cfg.q_lora_rank:
        a("attention.q_lora_rank", cfg.q_lora_rank)
    a("attention.kv_lora_rank", cfg.kv_lora_rank)
    sc = dict(cfg.rope_scaling)
    if sc.get("rope_type") == "yarn" and "mscale_all_dim" in sc:
        a("rope.scaling.yarn_log_multiplier", 0.1 * float(sc["mscale_all_dim"]))


def _gemma4_keys(cfg: ModelConfig, kv: list[tuple[str, Any]], a: Callable[[str, Any], None]) -> None:
    """gemma4's keys as llama.cpp's converter writes them: key/value length and rope dims of
    the full layers, the sliding layers' as *_swa, KV heads per layer, the layer pattern."""
    arch, full = GGUF_ARCH[cfg.arch], cfg.global_head_dim or cfg.head_dim
    kvs = [cfg.kv_heads(i) for i in range(cfg.n_layer)]
    sizes = {"attention.key_length": full, "attention.value_length": full, "rope.dimension_count": full,
             "attention.head_count_kv": kvs if len(set(kvs)) > 1 else cfg.n_kv_head}
    kv[:] = [(k, sizes.get(k.removeprefix(f"{arch}."), v)) for k, v in kv]
    a("attention.key_length_swa", cfg.head_dim)
    a("attention.value_length_swa", cfg.head_dim)
    a("rope.dimension_count_swa", cfg.head_dim)
    a("rope.freq_base_swa", float(cfg.rope_local_theta or cfg.rope_theta))
    a("attention.sliding_window", cfg.sliding_window)
    a("attention.sliding_window_pattern", [cfg.window(i) is not None for i in range(cfg.n_layer)])
    a("attention.shared_kv_layers", 0)
    a("embedding_length_per_layer_input", 0)
    if cfg.final_logit_softcapping:
        a("final_logit_softcapping", float(cfg.final_logit_softcapping))


def extra_arrays(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Gemma 4's proportional RoPE as llama.cpp holds it: frequency factors of the full layers,
    1 for the pairs that turn and 1e30 (no rotation) for the rest."""
    sc = dict(cfg.rope_scaling)
    if cfg.arch != "gemma4" or sc.get("rope_type") != "proportional":
        return {}
    half = (cfg.global_head_dim or cfg.head_dim) // 2
    turn = int(float(sc.get("partial_rotary_factor", 1.0)) * half)
    return {"rope_freqs.weight": np.array([1.0] * turn + [1e30] * (half - turn), dtype=np.float32)}
