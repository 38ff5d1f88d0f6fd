"""The config.json front end: ModelConfig from the contents of a transformers config.json
(both the 4.x spelling with `rope_theta` / `rope_scaling` and the 5.x `rope_parameters`), a
preset of the same format, or the config.json keys GGUF metadata maps to
(graphir.models.gguf_source). transformers' class defaults fill the keys a file leaves out;
per-family readers live in config_families / config_moe, the strict key readers in config_keys.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from graphir.models import config_families, config_moe
from graphir.models.config_keys import ConfigError, _bool, _get, _int, _real
from graphir.models.config_schema import HYBRID, MAX_LAYERS, SIGMOID_ROUTED, Arch, ModelConfig

# model_type in config.json -> our architecture family
MODEL_TYPES: dict[str, Arch] = {
    "llama": "llama", "mistral": "llama",
    "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "qwen3_next": "qwen3_next",
    "seed_oss": "seed_oss", "ministral3": "ministral3", "ernie4_5_moe": "ernie4_5_moe",
    "hunyuan_v1_moe": "hunyuan_v1_moe", "glm4_moe": "glm4_moe", "minimax_m2": "minimax_m2",
    "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3",  # Kimi-K2 ships DeepseekV3ForCausalLM
    "gpt_oss": "gpt_oss",
    "gemma3_text": "gemma3",  # Gemma3ForConditionalGeneration's config nests it as text_config
    "gemma4_text": "gemma4", "gemma4": "gemma4",  # likewise Gemma4ForConditionalGeneration's
    # Qwen3.5 ships as a vision-language wrapper; its text_config carries the *_text type
    "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe",
}


# transformers' class defaults for keys a config.json may leave out, where they differ from the
# generic fallbacks in from_hf_dict (Qwen3Config.head_dim is 128, not hidden/heads, ...)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"num_key_value_heads": 8},
    "qwen3": {"head_dim": 128, "num_key_value_heads": 32},
    "qwen3_moe": {"num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    "qwen3_next": {"head_dim": 256, "num_key_value_heads": 2, "num_experts": 512, "num_experts_per_tok": 10,
                   "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
    "seed_oss": {"head_dim": 128, "num_key_value_heads": 8, "attention_bias": True},
    "ministral3": {"head_dim": 128, "num_key_value_heads": 8, "rms_norm_eps": 1e-5},
    "ernie4_5_moe": {"num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "max_position_embeddings": 131072, "moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536,
                     "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": -1,
                     "moe_layer_interval": 1},
    "hunyuan_v1_moe": {"rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "num_experts": 1, "moe_topk": 1},
    # Glm4MoeConfig / MiniMaxM2Config class defaults (transformers 5)
    "glm4_moe": {"num_key_value_heads": 8, "n_routed_experts": 128, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 1408, "n_shared_experts": 1, "first_k_dense_replace": 1,
                 "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
    "deepseek_v3": {"n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                    "n_shared_experts": 1, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "n_group": 8,
                    "topk_group": 4, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
                    "qk_nope_head_dim": 128, "v_head_dim": 128, "rope_interleave": True},
    "minimax_m2": {"head_dim": 128, "num_key_value_heads": 8, "num_local_experts": 256, "num_experts_per_tok": 8,
                   "rope_theta": 5000000.0, "max_position_embeddings": 196608},
    # GptOssConfig's class defaults (the 120b shape)
    "gpt_oss": {"head_dim": 64, "num_key_value_heads": 8, "num_local_experts": 128, "num_experts_per_tok": 4,
                "sliding_window": 128, "rms_norm_eps": 1e-5, "attention_bias": True, "rope_theta": 150000.0,
                "swiglu_alpha": 1.702, "swiglu_limit": 7.0},
    # Gemma3TextConfig's class defaults (the published config.json lists only what differs)
    "gemma3_text": {"vocab_size": 262208, "head_dim": 256, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                    "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
                    "max_position_embeddings": 131072},
    # Gemma4TextConfig's class defaults (transformers 5.x)
    "gemma4_text": {"vocab_size": 262144, "head_dim": 256, "num_key_value_heads": 4, "sliding_window": 512,
                    "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
                    "max_position_embeddings": 131072, "global_head_dim": 512, "hidden_size_per_layer_input": 256},
    # Qwen3_5TextConfig / Qwen3_5MoeTextConfig (transformers 5.x) over Qwen3NextConfig's linear-attention defaults
    "qwen3_5_text": {"head_dim": 256, "num_key_value_heads": 4},
    "qwen3_5_moe_text": {"head_dim": 256, "num_key_value_heads": 2, "num_experts": 256, "num_experts_per_tok": 8,
                         "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
}
_HF_DEFAULTS["gemma4"] = _HF_DEFAULTS["gemma4_text"]
_HF_DEFAULTS["qwen3_5"], _HF_DEFAULTS["qwen3_5_moe"] = _HF_DEFAULTS["qwen3_5_text"], _HF_DEFAULTS["qwen3_5_moe_text"]
_HF_DEFAULTS["kimi_k2"] = _HF_DEFAULTS["deepseek_v3"]  # Kimi-K2 configs name the DeepSeek-V3 class


_PARTIAL = {"qwen3_next": 0.25, "qwen3_5": 0.25, "qwen3_5_moe": 0.25, "glm4_moe": 0.5}  # default partial_rotary_factor


def _layer_types(d: dict[str, Any], n_layer: int, default: Any) -> tuple[str, ...]:
    """config.json's layer_types, or transformers' default pattern `default(i)` when absent."""
    types = d.get("layer_types")
    if types is None:
        return tuple(default(i) for i in range(n_layer))
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"layer_types must be a list of strings, got {types!r}")
    return tuple(types)


def from_hf_dict(d: dict[str, Any], name: str = "") -> ModelConfig:
    """ModelConfig from the contents of a transformers config.json."""
    if not isinstance(d, dict):
        raise ConfigError("config.json must hold a JSON object")
    text = d.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ConfigError(f"text_config must be a JSON object, got {type(text).__name__}")
    if isinstance(text, dict):  # a multimodal wrapper: the decoder is the text tower, the vision tower is ignored
        outer = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        d = {**outer, **text} if "model_type" in text else {**d, **text}
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"unknown model_type {mt!r}; supported: {', '.join(sorted(MODEL_TYPES))}")
    arch = MODEL_TYPES[mt]
    window = d.get("sliding_window", 4096 if mt == "mistral" else None)  # MistralConfig's default is 4096
    if mt in ("mistral", "ministral3") and window is not None:
        # transformers masks keys older than the window; graphir's attention here is full causal
        raise ConfigError(f"sliding_window={window} is not supported for {mt} (only sliding_window=null)")
    if d.get("mlp_bias") or (mt == "ernie4_5_moe" and d.get("use_bias")):
        raise ConfigError("mlp_bias / use_bias = true (biases on the FFN projections) is not supported")
    d = {**{k: v for k, v in _HF_DEFAULTS.get(mt, {}).items() if k != "num_experts" or "num_local_experts" not in d},
         **d}
    if mt == "gpt_oss" and not d.get("rope_parameters") and not d.get("rope_scaling"):
        # GptOssConfig's default: YaRN x32 over a 4096-token original context, untruncated ramp
        d = {**d, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "truncate": False, "original_max_position_embeddings": 4096}}
    rope = dict(_get(d, "rope_parameters", default={}) or {})
    local_rope: dict[str, Any] = {}
    if isinstance(rope.get("full_attention"), dict):  # 5.x: one set per layer type (Gemma 3)
        local_rope, rope = dict(rope.get("sliding_attention") or {}), dict(rope["full_attention"])
    legacy = dict(_get(d, "rope_scaling", default={}) or {})
    rope_theta = _get(rope, "rope_theta", default=_get(d, "rope_theta", default=10000.0))
    partial = _get(rope, "partial_rotary_factor",
                   default=_get(d, "partial_rotary_factor", default=_PARTIAL.get(arch, 1.0)))
    if arch == "minimax_m2" and "partial_rotary_factor" not in rope and d.get("rotary_dim") is not None:
        # released MiniMax-M2 configs give the rotary part as rotary_dim (transformers converts it)
        partial = _real(d, "rotary_dim") / _int(d, "head_dim")
    # Qwen3.5's multimodal RoPE: for text every position stream is the token index, so the
    # interleaved sections rotate exactly as plain RoPE does; the section keys change nothing
    scaling = {k: v for k, v in {**legacy, **rope}.items()
               if k not in ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    try:
        n_layer = _int(d, "num_hidden_layers")
        if n_layer > MAX_LAYERS:  # before layer_types below makes a list this long
            raise ConfigError(f"num_hidden_layers={n_layer} exceeds the maximum of {MAX_LAYERS} layers")
        n_head = _int(d, "num_attention_heads")
        hidden = _int(d, "hidden_size")
        if arch == "qwen3_5_moe" and "intermediate_size" not in d:  # every layer is MoE: the key is absent
            d = {**d, "intermediate_size": _int(d, "moe_intermediate_size")}
        fields: dict[str, Any] = dict(
            arch=arch, name=name, vocab_size=_int(d, "vocab_size"), hidden_size=hidden, n_layer=n_layer,
            n_head=n_head, n_kv_head=_int(d, "num_key_value_heads", n_head),
            head_dim=_int(d, ("head_dim", "attention_head_dim"), hidden // n_head if n_head > 0 else 0),
            intermediate_size=_int(d, "intermediate_size"),
            rms_norm_eps=_real(d, "rms_norm_eps", 1e-6), rope_theta=_real({"rope_theta": rope_theta}, "rope_theta"),
            rope_scaling=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items())),
            partial_rotary_factor=_real({"partial_rotary_factor": partial}, "partial_rotary_factor"),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            attention_bias=_bool(d, "attention_bias", False),
            max_position_embeddings=_int(d, "max_position_embeddings", 4096),
            torch_dtype=str(_get(d, "torch_dtype", "dtype", default="bfloat16")),
        )
        if mt == "seed_oss":
            fields["attention_out_bias"] = _bool(d, "attention_out_bias", False)
        if arch == "ministral3":
            beta = scaling.get("llama_4_scaling_beta")
            if beta:  # the divisor is the pre-YaRN context, as transformers reads it
                fields.update(attn_temperature_beta=_real(scaling, "llama_4_scaling_beta"),
                              attn_temperature_len=_int(scaling, "original_max_position_embeddings"))
        if arch == "qwen3_5_moe":  # MoE in every layer, top-k always renormalised (Qwen3VLMoe's router)
            fields.update(n_expert=_int(d, "num_experts"), n_expert_used=_int(d, "num_experts_per_tok"),
                          moe_intermediate_size=_int(d, "moe_intermediate_size"),
                          shared_expert_intermediate_size=_int(d, "shared_expert_intermediate_size"),
                          norm_topk_prob=True)
        if arch in ("qwen3_moe", "qwen3_next"):
            fields.update(
                n_expert=_int(d, ("num_experts", "num_local_experts"), 0),
                n_expert_used=_int(d, "num_experts_per_tok", 0),
                moe_intermediate_size=_int(d, "moe_intermediate_size", 0),
                # Qwen3-MoE has no shared expert: transformers ignores the key there
                shared_expert_intermediate_size=_int(d, "shared_expert_intermediate_size", 0)
                if arch == "qwen3_next" else 0,
                norm_topk_prob=_bool(d, "norm_topk_prob", arch == "qwen3_next"),
                decoder_sparse_step=_int(d, "decoder_sparse_step", 1),
                mlp_only_layers=tuple(_int({"mlp_only_layers": i}, "mlp_only_layers")
                                      for i in _get(d, "mlp_only_layers", default=[])),
            )
        if arch in ("ernie4_5_moe", "hunyuan_v1_moe"):
            fields.update(config_moe.READERS[arch](d, n_layer, fields))
        if arch in SIGMOID_ROUTED:
            fields.update(config_families.sigmoid_moe(d, arch, n_layer))
            if arch == "deepseek_v3":
                fields.update(config_families.mla(d))
        if arch == "gpt_oss":
            fields.update(
                n_expert=_int(d, ("num_local_experts", "num_experts")),
                n_expert_used=_int(d, ("num_experts_per_tok", "experts_per_token")),
                moe_intermediate_size=_int(d, "intermediate_size"),  # the experts' width
                sliding_window=_int(d, "sliding_window"),
                swiglu_alpha=_real(d, "swiglu_alpha"), swiglu_limit=_real(d, "swiglu_limit"),
                layer_types=_layer_types(d, n_layer, lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention"),
            )
        if arch == "gemma3":
            if _get(d, "attn_logit_softcapping") is not None:
                raise ConfigError("attn_logit_softcapping (Gemma 2's) is not supported")
            if local_rope.get("rope_type", "default") != "default":
                raise ConfigError(f"sliding layers' rope_type {local_rope['rope_type']!r}: only default is supported")
            act = _get(d, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
            if act not in ("gelu_pytorch_tanh", "gelu"):  # transformers runs gelu as the tanh form here
                raise ConfigError(f"hidden_activation {act!r}: Gemma 3 uses gelu_pytorch_tanh")
            pattern = _int(d, "sliding_window_pattern", 6)
            fields.update(
                sliding_window=_int(d, "sliding_window"), hidden_act="gelu_pytorch_tanh",
                rope_local_theta=_real({"t": _get(local_rope, "rope_theta", default=_get(d, "rope_local_base_freq"))}, "t"),
                query_pre_attn_scalar=_real(d, "query_pre_attn_scalar"),
                final_logit_softcapping=_real({"c": _get(d, "final_logit_softcapping", default=0.0)}, "c"),
                layer_types=_layer_types(d, n_layer,
                                         lambda i: "sliding_attention" if (i + 1) % max(pattern, 1) else "full_attention"),
            )
        if arch == "gemma4":
            fields.update(config_families.gemma4(d, n_layer, rope, local_rope))
            fields.update(partial_rotary_factor=1.0, rope_scaling=tuple(sorted(
                (k, v) for k, v in rope.items() if k in ("rope_type", "partial_rotary_factor", "factor"))))
        if arch in HYBRID:
            types = d.get("layer_types")
            if types is None:
                interval = _int(d, "full_attention_interval", 4)
                if interval < 1:
                    raise ConfigError(f"full_attention_interval={interval} must be at least 1")
                types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layer)]
            elif not isinstance(types, list):
                raise ConfigError(f"layer_types must be a list, got {type(types).__name__}")
            fields.update(
                layer_types=tuple(types),
                linear_num_key_heads=_int(d, "linear_num_key_heads", 16),
                linear_num_value_heads=_int(d, "linear_num_value_heads", 32),
                linear_key_head_dim=_int(d, "linear_key_head_dim", 128),
                linear_value_head_dim=_int(d, "linear_value_head_dim", 128),
                linear_conv_kernel_dim=_int(d, "linear_conv_kernel_dim", 4),
            )
        cfg = ModelConfig(**fields)
        # without head_dim, transformers derives it as hidden / heads: a remainder is a typo,
        # not something to truncate (LlamaConfig refuses it; an explicit head_dim defines the model)
        # (Gemma3TextConfig refuses a remainder even with an explicit head_dim; MLA's heads are no slice of it)
        if ("head_dim" not in d and "attention_head_dim" not in d or arch == "gemma3") and hidden % n_head \
                and arch != "deepseek_v3":
            raise ConfigError(f"hidden_size={hidden} is not a multiple of num_attention_heads={n_head}")
        return cfg
    except ConfigError:
        raise
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            msg = err.get("msg", str(e)).removeprefix("Value error, ")
            raise ConfigError(f"inconsistent config: {where + ': ' if where else ''}{msg}") from None
        raise ConfigError(f"bad config value: {e}") from None
