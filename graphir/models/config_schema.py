"""ModelConfig: the architecture hyper-parameters every front end and pass reads, their
validation (one line saying what is inconsistent) and the facts derived from them (per-layer
head sizes, windows, which norms and routers a family has).

graphir.models.config_hf builds it from a transformers config.json; graphir.models.config is
the public face of both.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

Arch = Literal["llama", "qwen3", "qwen3_moe", "qwen3_next", "seed_oss", "ministral3", "ernie4_5_moe", "hunyuan_v1_moe",
               "glm4_moe", "minimax_m2", "deepseek_v3", "gpt_oss", "gemma3", "qwen3_5", "qwen3_5_moe", "gemma4"]
# Qwen3-Next-style hybrids: gated delta-net + gated attention, zero-centred norms
HYBRID = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
# families whose router scores experts with a sigmoid plus a selection-only bias (DeepSeek-V3 style)
SIGMOID_ROUTED = ("glm4_moe", "minimax_m2", "deepseek_v3")

# architectures whose layers differ by kind: the kinds their layer_types may name
LAYER_TYPES: dict[str, tuple[str, ...]] = {
    **{a: ("full_attention", "linear_attention") for a in HYBRID},
    "gpt_oss": ("full_attention", "sliding_attention"),
    "gemma3": ("full_attention", "sliding_attention"),
    "gemma4": ("full_attention", "sliding_attention"),
}


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
