"""Read a GGUF file's header: hyper-parameters from its metadata, storage types from its
tensor table. Only the header is parsed (the reader memory-maps the file and touches no
tensor data), so an 80 GB file lowers in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graphir.dtypes import DType, DTypeError, from_ggml
from graphir.models.config import ConfigError, from_hf_dict

# GGUF general.architecture -> config.json model_type
GGUF_ARCHES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "qwen3next": "qwen3_next"}


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    # ReaderField.contents() decodes strings, scalars and arrays
    return f.contents()


def read_gguf(path: Path) -> "ModelSource":
    from gguf import GGUFReader

    from graphir.models.sources import ModelSource

    try:
        size = path.stat().st_size
        reader = GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, OSError, AssertionError) as e:
        # the reader raises bare ValueError/IndexError on short or corrupt headers
        raise ConfigError(f"{path}: not a readable GGUF file (truncated or corrupt: {str(e).splitlines()[0][:120]})") \
            from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ConfigError(f"{path}: truncated GGUF: tensor data needs {end} bytes, file has {size}")
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHES:
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHES)}")

    def k(name: str, default: Any = None) -> Any:
        v = _field(reader, f"{arch}.{name}")
        return default if v is None else v

    tensors: dict[str, tuple[tuple[int, ...], DType]] = {}
    for t in reader.tensors:
        try:
            dt = from_ggml(int(t.tensor_type))
        except DTypeError as e:
            raise ConfigError(f"{path}: tensor {t.name}: {e}") from None
        # GGUF stores ggml's ne order (fastest dim first); graphir uses torch's order
        tensors[t.name] = (tuple(int(x) for x in reversed(t.shape.tolist())), dt)

    n_head = k("attention.head_count")
    n_embd = k("embedding_length")
    vocab = k("vocab_size")
    if vocab is None:
        tokens = _field(reader, "tokenizer.ggml.tokens")
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
    }
    n_rot = k("rope.dimension_count")
    if n_rot and head_dim and n_rot != head_dim:
        d["partial_rotary_factor"] = n_rot / head_dim
    scaling = k("rope.scaling.type")
    if scaling and scaling != "none":
        d["rope_scaling"] = {"rope_type": scaling, "factor": k("rope.scaling.factor", 1.0),
                             "original_max_position_embeddings": k("rope.scaling.original_context_length")}
    if arch in ("qwen3moe", "qwen3next"):
        d.update(num_experts=k("expert_count", 0), num_experts_per_tok=k("expert_used_count", 0),
                 moe_intermediate_size=k("expert_feed_forward_length", 0),
                 shared_expert_intermediate_size=k("expert_shared_feed_forward_length", 0),
                 norm_topk_prob=bool(k("expert_weights_norm", arch == "qwen3next")))
    if arch == "qwen3next":
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
    from gguf import GGUFReader

    r = GGUFReader(str(path), "r")
    return {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in r.tensors}
