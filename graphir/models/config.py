"""ModelConfig: the architecture hyper-parameters every front end and pass reads.

Built from a transformers `config.json` (both the 4.x spelling with `rope_theta` /
`rope_scaling` and the 5.x `rope_parameters`), from a preset of the same format, or from
GGUF metadata (graphir.models.gguf_source). Validation says in one line what is inconsistent.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from graphir.models import config_families, config_moe
from graphir.models.config_keys import ConfigError, _bool, _get, _int, _real  # ConfigError is re-exported
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

Arch = Literal["llama", "qwen3", "qwen3_moe", "qwen3_next", "seed_oss", "ministral3", "ernie4_5_moe", "hunyuan_v1_moe",
               "glm4_moe", "minimax_m2", "deepseek_v3", "gpt_oss", "gemma3", "qwen3_5", "qwen3_5_moe", "gemma4"]
# Qwen3-Next-style hybrids: gated delta-net + gated attention, zero-centred norms
HYBRID = ("qwen3_next", "qwen3_5", "qwen3_5_moe")

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
# families whose router scores experts with a sigmoid plus a selection-only bias (DeepSeek-V3 style)
SIGMOID_ROUTED = ("glm4_moe", "minimax_m2", "deepseek_v3")


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


# architectures whose layers differ by kind: the kinds their layer_types may name
LAYER_TYPES: dict[str, tuple[str, ...]] = {
    **{a: ("full_attention", "linear_attention") for a in HYBRID},
    "gpt_oss": ("full_attention", "sliding_attention"),
    "gemma3": ("full_attention", "sliding_attention"),
    "gemma4": ("full_attention", "sliding_attention"),
}
_HF_DEFAULTS["kimi_k2"] = _HF_DEFAULTS["deepseek_v3"]  # Kimi-K2 configs name the DeepSeek-V3 class


# The deepest model graphir builds: published models have < 200 layers; a config asking for
# more is a typo (or an attack on the machine), refused before any list of layers is made.
MAX_LAYERS = 4096


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Arch
    name: str = ""
    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs, e.g. rope_type=llama3
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool | None = None  # bias on attn_output; None: as attention_bias (Seed-OSS sets it apart)
    # Llama-4 query temperature (Mistral 3): q * (1 + beta * ln(1 + floor(pos / length))); 0 = off
    attn_temperature_beta: float = 0.0
    attn_temperature_len: int = 0
    max_position_embeddings: int = 4096
    torch_dtype: str = "bfloat16"
    # mixture of experts
    n_expert: int = 0
    n_expert_used: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = True  # Qwen's sigmoid gate on the shared expert; ERNIE / Hunyuan have none
    router_bias: bool = False  # a per-expert selection bias (GGUF exp_probs_b): ERNIE 4.5 and the sigmoid routers
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # sigmoid routing (glm4_moe, minimax_m2): top-k of sigmoid + bias within the best groups,
    # weights sigmoid (renormalised when norm_topk_prob) times routed_scaling_factor
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    use_qk_norm: bool = False  # glm4_moe's per-head Q/K norm switch
    # multi-head latent attention (deepseek_v3): head_dim is the rotary part qk_rope_head_dim;
    # the cache holds kv_lora_rank + head_dim per token, shared by every head
    q_lora_rank: int = 0  # 0: q projected directly from the hidden state
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # checkpoints store the rotary dims as interleaved pairs
    # hybrid recurrent (qwen3_next): per layer "full_attention" or "linear_attention"
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    # sliding-window attention: layers whose layer_types entry is "sliding_attention" see the
    # last `sliding_window` positions only (gpt_oss)
    sliding_window: int = 0
    # gpt_oss's clamped SwiGLU of the experts
    swiglu_alpha: float = 0.0
    swiglu_limit: float = 0.0
    # gemma3: sliding layers' RoPE base (unscaled; 0 = rope_theta), 1/sqrt(query_pre_attn_scalar)
    # as the attention scale (0 = head_dim), the FFN's activation, cap * tanh(logits / cap)
    rope_local_theta: float = 0.0
    query_pre_attn_scalar: float = 0.0
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"
    final_logit_softcapping: float = 0.0
    # gemma4: the full layers' own head size and KV heads (0 = head_dim / num_key_value_heads),
    # and their values taken from the key projection (attention_k_eq_v: no attn_v)
    global_head_dim: int = 0
    global_kv_head: int = 0
    k_eq_v: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        pos = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.n_layer,
               "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head,
               "head_dim": self.head_dim, "intermediate_size": self.intermediate_size}
        bad = [f"{k}={v}" for k, v in pos.items() if v <= 0]
        if bad:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        if self.n_layer > MAX_LAYERS:
            raise ValueError(f"num_hidden_layers={self.n_layer} exceeds the maximum of {MAX_LAYERS} layers")
        reals = {"rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                 "partial_rotary_factor": self.partial_rotary_factor}
        bad = [f"{k}={v}" for k, v in reals.items() if not (math.isfinite(v) and v > 0)]
        if bad:  # eps <= 0 divides by zero in rms_norm: NaN logits, not an error, downstream
            raise ValueError(f"must be finite and positive: {', '.join(bad)}")
        if self.partial_rotary_factor > 1:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must be at most 1")
        if self.max_position_embeddings <= 0:
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings} must be positive")
        if self.attn_temperature_beta and self.attn_temperature_len <= 0:
            raise ValueError("llama_4_scaling_beta needs original_max_position_embeddings > 0")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"num_attention_heads={self.n_head} is not a multiple of "
                             f"num_key_value_heads={self.n_kv_head}")
        n_rot = self.n_rot
        if n_rot <= 0 or n_rot % 2 or n_rot > self.head_dim:
            raise ValueError(f"rotary dims {n_rot} (head_dim={self.head_dim} x partial_rotary_factor="
                             f"{self.partial_rotary_factor}) must be even and within the head")
        if self.arch == "qwen3_5_moe" and self.n_expert <= 0:
            raise ValueError(f"num_experts={self.n_expert} must be positive: every qwen3_5_moe layer is MoE")
        if self.is_moe:
            if not 0 < self.n_expert_used <= self.n_expert:
                raise ValueError(f"num_experts_per_tok={self.n_expert_used} must be in 1..num_experts="
                                 f"{self.n_expert}")
            if self.moe_intermediate_size <= 0:
                raise ValueError("moe_intermediate_size must be positive for a mixture of experts")
            if self.decoder_sparse_step < 1:
                raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be at least 1")
            outside = [i for i in self.mlp_only_layers if not 0 <= i < self.n_layer]
            if outside:
                raise ValueError(f"mlp_only_layers {outside} are outside 0..{self.n_layer - 1}")
            if self.n_group < 1 or self.n_expert % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.n_expert}")
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            if self.n_group > 1 and self.n_expert // self.n_group < 2:
                raise ValueError(f"{self.n_expert} experts in {self.n_group} groups leave fewer than 2 per group")
            if self.n_expert_used > self.topk_group * (self.n_expert // self.n_group):
                raise ValueError(f"num_experts_per_tok={self.n_expert_used} exceeds the experts of "
                                 f"topk_group={self.topk_group} groups")
        if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor} must be finite and positive")
        if self.arch == "deepseek_v3":
            mla = {"kv_lora_rank": self.kv_lora_rank, "qk_nope_head_dim": self.qk_nope_head_dim,
                   "v_head_dim": self.v_head_dim}
            bad = [f"{k}={v}" for k, v in mla.items() if v <= 0] + (
                [f"q_lora_rank={self.q_lora_rank}"] if self.q_lora_rank < 0 else [])
            if bad:
                raise ValueError(f"multi-head latent attention needs positive sizes: {', '.join(bad)}")
            if self.attention_bias:
                raise ValueError("attention_bias=true is not supported for deepseek_v3")
        kinds = LAYER_TYPES.get(self.arch)
        if kinds is not None:
            if len(self.layer_types) != self.n_layer:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")
            unknown = sorted(set(self.layer_types) - set(kinds))
            if unknown:
                raise ValueError(f"unknown layer type(s) {', '.join(unknown)}")
        if self.is_hybrid:
            lin = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                   self.linear_value_head_dim, self.linear_conv_kernel_dim)
            if min(lin) <= 0:
                raise ValueError("linear attention sizes (linear_num_key_heads, linear_num_value_heads, "
                                 "linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim) must be positive")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ValueError(f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                                 f"linear_num_key_heads={self.linear_num_key_heads}")
        if self.arch == "gemma4" and self.n_head % self.kv_heads(self.n_layer - 1):
            raise ValueError(f"num_attention_heads={self.n_head} is not a multiple of "
                             f"num_global_key_value_heads={self.global_kv_head}")
        if self.arch in ("gpt_oss", "gemma3", "gemma4"):
            if self.sliding_window < 1 and "sliding_attention" in self.layer_types:
                raise ValueError(f"sliding_window={self.sliding_window} must be at least 1 with sliding layers")
        if self.arch == "gpt_oss":
            if not (self.swiglu_alpha > 0 and self.swiglu_limit > 0):
                raise ValueError(f"swiglu_alpha={self.swiglu_alpha} and swiglu_limit={self.swiglu_limit} "
                                 "must be positive")
        return self

    # ---- derived facts every front end and pass shares -------------------------------------
    @property
    def is_moe(self) -> bool:
        moe = ("qwen3_moe", "qwen3_next", "qwen3_5_moe", "ernie4_5_moe", "hunyuan_v1_moe", "gpt_oss", *SIGMOID_ROUTED)
        return self.arch in moe and self.n_expert > 0

    @property
    def sigmoid_router(self) -> bool:
        return self.arch in SIGMOID_ROUTED

    @property
    def out_bias(self) -> bool:
        """Whether attn_output carries a bias."""
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    @property
    def qk_norm(self) -> bool:
        """Whether attention has RMS norms on Q and K (per head; MiniMax-M2's span all heads)."""
        if self.arch == "glm4_moe":
            return self.use_qk_norm
        return self.arch in ("qwen3", "qwen3_moe", *HYBRID, "hunyuan_v1_moe", "minimax_m2", "gemma3", "gemma4")

    @property
    def qk_norm_after_rope(self) -> bool:
        """Hunyuan normalises the rotated Q and K (the others normalise before RoPE)."""
        return self.arch == "hunyuan_v1_moe"

    @property
    def is_hybrid(self) -> bool:
        """Qwen3-Next style: delta-net and gated attention layers, zero-centred (1 + w) norms."""
        return self.arch in HYBRID

    @property
    def n_rot(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gqa(self) -> int:
        return self.n_head // self.n_kv_head

    def is_recurrent(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def zero_centred_norms(self) -> bool:
        """RMSNorm weights stored as w with (1 + w) applied (the Qwen3-Next hybrids, Gemma)."""
        return self.is_hybrid or self.arch == "gemma3"

    @property
    def attn_scale(self) -> float:
        if self.arch == "gemma4":  # its Q/K norms set the logits' scale: no 1/sqrt(d)
            return 1.0
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies the embedding rows by sqrt(hidden)."""
        return self.hidden_size ** 0.5 if self.arch in ("gemma3", "gemma4") else None

    def window(self, layer: int) -> int | None:
        """The attention window of `layer` (None: it attends to the whole context)."""
        sliding = bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    def head_size(self, layer: int) -> int:
        """The head size of `layer` (Gemma 4's full layers have their own)."""
        return self.global_head_dim if self.global_head_dim and self.window(layer) is None else self.head_dim

    def kv_heads(self, layer: int) -> int:
        """The KV heads of `layer` (Gemma 4's full layers have their own)."""
        return self.global_kv_head if self.global_kv_head and self.window(layer) is None else self.n_kv_head

    def is_moe_layer(self, layer: int) -> bool:
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if not self.is_recurrent(i))

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if self.is_recurrent(i))

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + \
            self.linear_num_value_heads * self.linear_value_head_dim

    def with_layers(self, n: int) -> "ModelConfig":
        d = self.model_dump()
        d["n_layer"] = n
        if self.layer_types:
            d["layer_types"] = self.layer_types[:n]
        return ModelConfig(**d)


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
