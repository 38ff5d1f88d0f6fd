"""ModelConfig: the architecture hyper-parameters every front end and pass reads.

Built from a transformers `config.json` (both the 4.x spelling with `rope_theta` /
`rope_scaling` and the 5.x `rope_parameters`), from a preset of the same format, or from
GGUF metadata (graphir.models.gguf_source). Validation says in one line what is inconsistent.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from graphir.errors import GraphirError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

Arch = Literal["llama", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe"]
# Qwen3-Next-style hybrids: gated delta-net + gated attention, zero-centred norms
HYBRID = ("qwen3_next", "qwen3_5", "qwen3_5_moe")

# model_type in config.json -> our architecture family
MODEL_TYPES: dict[str, Arch] = {
    "llama": "llama", "mistral": "llama",
    "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "qwen3_next": "qwen3_next",
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
    # Qwen3_5TextConfig / Qwen3_5MoeTextConfig (transformers 5.x) over Qwen3NextConfig's linear-attention defaults
    "qwen3_5_text": {"head_dim": 256, "num_key_value_heads": 4},
    "qwen3_5_moe_text": {"head_dim": 256, "num_key_value_heads": 2, "num_experts": 256, "num_experts_per_tok": 8,
                         "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
}
_HF_DEFAULTS["qwen3_5"], _HF_DEFAULTS["qwen3_5_moe"] = _HF_DEFAULTS["qwen3_5_text"], _HF_DEFAULTS["qwen3_5_moe_text"]


# The deepest model graphir builds: published models have < 200 layers; a config asking for
# more is a typo (or an attack on the machine), refused before any list of layers is made.
MAX_LAYERS = 4096


class ConfigError(GraphirError):
    """A model description graphir cannot use; the message is one line."""


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
    max_position_embeddings: int = 4096
    torch_dtype: str = "bfloat16"
    # mixture of experts
    n_expert: int = 0
    n_expert_used: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # hybrid recurrent (qwen3_next): per layer "full_attention" or "linear_attention"
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0

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
        if self.is_hybrid:
            if len(self.layer_types) != self.n_layer:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")
            unknown = sorted(set(self.layer_types) - {"full_attention", "linear_attention"})
            if unknown:
                raise ValueError(f"unknown layer type(s) {', '.join(unknown)}")
            lin = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                   self.linear_value_head_dim, self.linear_conv_kernel_dim)
            if min(lin) <= 0:
                raise ValueError("linear attention sizes (linear_num_key_heads, linear_num_value_heads, "
                                 "linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim) must be positive")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ValueError(f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                                 f"linear_num_key_heads={self.linear_num_key_heads}")
        return self

    # ---- derived facts every front end and pass shares -------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.arch in ("qwen3_moe", "qwen3_next", "qwen3_5_moe") and self.n_expert > 0

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


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


_MISSING = object()


def _value(d: dict[str, Any], keys: str | tuple[str, ...], default: Any) -> tuple[str, Any]:
    names = (keys,) if isinstance(keys, str) else keys
    v = _get(d, *names, default=_MISSING)
    if v is _MISSING:
        if default is _MISSING:
            raise KeyError(names[0])
        return names[0], default
    return next(k for k in names if k in d and d[k] is not None), v


def _int(d: dict[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING) -> int:
    """A count: a JSON integer. 2.5 (or 2.0, or "2") is refused, as transformers' strict
    config classes refuse it, rather than truncated to 2."""
    key, v = _value(d, keys, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: must be an integer, got {v!r}")
    return v


def _real(d: dict[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING) -> float:
    key, v = _value(d, keys, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {v!r}")
    return float(v)


def _bool(d: dict[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING) -> bool:
    key, v = _value(d, keys, default)
    if not isinstance(v, bool):  # bool("false") is True: never coerce
        raise ConfigError(f"{key}: must be true or false, got {v!r}")
    return v


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
    if d.get("mlp_bias"):
        raise ConfigError("mlp_bias=true (biases on the FFN projections) is not supported")
    d = {**{k: v for k, v in _HF_DEFAULTS.get(mt, {}).items() if k != "num_experts" or "num_local_experts" not in d},
         **d}
    rope = dict(_get(d, "rope_parameters", default={}) or {})
    legacy = dict(_get(d, "rope_scaling", default={}) or {})
    rope_theta = _get(rope, "rope_theta", default=_get(d, "rope_theta", default=10000.0))
    partial = _get(rope, "partial_rotary_factor",
                   default=_get(d, "partial_rotary_factor", default=0.25 if arch in HYBRID else 1.0))
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
            head_dim=_int(d, "head_dim", hidden // n_head if n_head > 0 else 0),
            intermediate_size=_int(d, "intermediate_size"),
            rms_norm_eps=_real(d, "rms_norm_eps", 1e-6), rope_theta=_real({"rope_theta": rope_theta}, "rope_theta"),
            rope_scaling=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items())),
            partial_rotary_factor=_real({"partial_rotary_factor": partial}, "partial_rotary_factor"),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            attention_bias=_bool(d, "attention_bias", False),
            max_position_embeddings=_int(d, "max_position_embeddings", 4096),
            torch_dtype=str(_get(d, "torch_dtype", "dtype", default="bfloat16")),
        )
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
        if "head_dim" not in d and hidden % n_head:
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
