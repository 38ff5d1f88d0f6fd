"""ModelConfig: the architecture hyper-parameters every front end and pass reads.

Built from a transformers `config.json` (both the 4.x spelling with `rope_theta` /
`rope_scaling` and the 5.x `rope_parameters`), from a preset of the same format, or from
GGUF metadata (graphir.models.gguf_source). Validation says in one line what is inconsistent.
"""

from __future__ import annotations

from typing import Any, Literal

from graphir.errors import GraphirError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

Arch = Literal["llama", "qwen3", "qwen3_moe", "qwen3_next"]

# model_type in config.json -> our architecture family
MODEL_TYPES: dict[str, Arch] = {
    "llama": "llama", "mistral": "llama",
    "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "qwen3_next": "qwen3_next",
}


# transformers' class defaults for keys a config.json may leave out, where they differ from the
# generic fallbacks in from_hf_dict (Qwen3Config.head_dim is 128, not hidden/heads, ...)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"num_key_value_heads": 8},
    "qwen3": {"head_dim": 128, "num_key_value_heads": 32},
    "qwen3_moe": {"num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    "qwen3_next": {"head_dim": 256, "num_key_value_heads": 2, "num_experts": 512, "num_experts_per_tok": 10,
                   "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
}


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
        if self.n_head % self.n_kv_head:
            raise ValueError(f"num_attention_heads={self.n_head} is not a multiple of "
                             f"num_key_value_heads={self.n_kv_head}")
        n_rot = self.n_rot
        if n_rot <= 0 or n_rot % 2 or n_rot > self.head_dim:
            raise ValueError(f"rotary dims {n_rot} (head_dim={self.head_dim} x partial_rotary_factor="
                             f"{self.partial_rotary_factor}) must be even and within the head")
        if self.is_moe:
            if not 0 < self.n_expert_used <= self.n_expert:
                raise ValueError(f"num_experts_per_tok={self.n_expert_used} must be in 1..num_experts="
                                 f"{self.n_expert}")
            if self.moe_intermediate_size <= 0:
                raise ValueError("moe_intermediate_size must be positive for a mixture of experts")
        if self.arch == "qwen3_next":
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
        return self.arch in ("qwen3_moe", "qwen3_next") and self.n_expert > 0

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


def from_hf_dict(d: dict[str, Any], name: str = "") -> ModelConfig:
    """ModelConfig from the contents of a transformers config.json."""
    if not isinstance(d, dict):
        raise ConfigError("config.json must hold a JSON object")
    if "text_config" in d and "model_type" not in d.get("text_config", {}):
        d = {**d, **d["text_config"]}
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
                   default=_get(d, "partial_rotary_factor", default=0.25 if arch == "qwen3_next" else 1.0))
    scaling = {k: v for k, v in {**legacy, **rope}.items()
               if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    try:
        n_layer = int(d["num_hidden_layers"])
        n_head = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        fields: dict[str, Any] = dict(
            arch=arch, name=name, vocab_size=int(d["vocab_size"]), hidden_size=hidden, n_layer=n_layer,
            n_head=n_head, n_kv_head=int(_get(d, "num_key_value_heads", default=n_head)),
            head_dim=int(_get(d, "head_dim", default=hidden // n_head if n_head else 0)),
            intermediate_size=int(d["intermediate_size"]),
            rms_norm_eps=float(_get(d, "rms_norm_eps", default=1e-6)), rope_theta=float(rope_theta),
            rope_scaling=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items())),
            partial_rotary_factor=float(partial),
            tie_word_embeddings=bool(_get(d, "tie_word_embeddings", default=False)),
            attention_bias=bool(_get(d, "attention_bias", default=False)),
            max_position_embeddings=int(_get(d, "max_position_embeddings", default=4096)),
            torch_dtype=str(_get(d, "torch_dtype", "dtype", default="bfloat16")),
        )
        if arch in ("qwen3_moe", "qwen3_next"):
            fields.update(
                n_expert=int(_get(d, "num_experts", "num_local_experts", default=0)),
                n_expert_used=int(_get(d, "num_experts_per_tok", default=0)),
                moe_intermediate_size=int(_get(d, "moe_intermediate_size", default=0)),
                # Qwen3-MoE has no shared expert: transformers ignores the key there
                shared_expert_intermediate_size=int(_get(d, "shared_expert_intermediate_size", default=0))
                if arch == "qwen3_next" else 0,
                norm_topk_prob=bool(_get(d, "norm_topk_prob", default=arch == "qwen3_next")),
                decoder_sparse_step=int(_get(d, "decoder_sparse_step", default=1)),
                mlp_only_layers=tuple(int(i) for i in _get(d, "mlp_only_layers", default=[])),
            )
        if arch == "qwen3_next":
            types = d.get("layer_types")
            if types is None:
                interval = int(_get(d, "full_attention_interval", default=4))
                types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layer)]
            fields.update(
                layer_types=tuple(types),
                linear_num_key_heads=int(d.get("linear_num_key_heads", 16)),
                linear_num_value_heads=int(d.get("linear_num_value_heads", 32)),
                linear_key_head_dim=int(d.get("linear_key_head_dim", 128)),
                linear_value_head_dim=int(d.get("linear_value_head_dim", 128)),
                linear_conv_kernel_dim=int(d.get("linear_conv_kernel_dim", 4)),
            )
        return ModelConfig(**fields)
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            msg = err.get("msg", str(e)).removeprefix("Value error, ")
            raise ConfigError(f"inconsistent config: {where + ': ' if where else ''}{msg}") from None
        raise ConfigError(f"bad config value: {e}") from None
