"""Read a GGUF file as a model source: hyper-parameters from its metadata, storage types from its
tensor table. Only the header is parsed (graphir.models.gguf_header: tensor data is never
touched, long arrays such as the tokenizer are skipped), so an 80 GB file lowers in
milliseconds, and files holding ik_llama.cpp's own quant types read like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graphir.dtypes import DType
from graphir.models.config import ConfigError, from_hf_dict
from graphir.models.gguf_header import read_header

# GGUF general.architecture -> config.json model_type
GGUF_ARCHES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "qwen3next": "qwen3_next",
               "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}


def read_gguf(path: Path) -> "ModelSource":
    from graphir.models.sources import ModelSource

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
    if n_rot and head_dim and n_rot != head_dim:
        d["partial_rotary_factor"] = n_rot / head_dim
    scaling = k("rope.scaling.type")
    if scaling and scaling != "none":
        d["rope_scaling"] = {"rope_type": scaling, "factor": k("rope.scaling.factor", 1.0),
                             "original_max_position_embeddings": k("rope.scaling.original_context_length")}
    if arch in ("qwen3moe", "qwen3next", "qwen35moe"):
        d.update(num_experts=k("expert_count", 0), num_experts_per_tok=k("expert_used_count", 0),
                 moe_intermediate_size=k("expert_feed_forward_length", 0),
                 shared_expert_intermediate_size=k("expert_shared_feed_forward_length", 0),
                 norm_topk_prob=bool(k("expert_weights_norm", True)))  # llama.cpp always normalises here
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
    return ModelSource(cfg, "gguf", path, types)


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes (torch order) from a GGUF file's table."""
    return {t.name: t.shape for t in read_header(path).tensors}
