"""Read a GGUF file's header: hyper-parameters from its metadata, storage types from its
tensor table. Only the header is parsed (tensor data is never touched, and long arrays such as
the tokenizer's 150k tokens and merges are skipped, not decoded), so an 80 GB file lowers in
milliseconds. `gguf.GGUFReader` builds a numpy view per array element and needs seconds for
a real tokenizer, which is why the header is walked here with `struct`.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from graphir.dtypes import DType, DTypeError, from_ggml
from graphir.models.config import ConfigError, from_hf_dict

# GGUF general.architecture -> config.json model_type
GGUF_ARCHES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "qwen3next": "qwen3_next"}

# GGUFValueType -> struct format (8 = string, 9 = array are handled apart)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_LONG = 4096  # arrays longer than this (tokenizer tables) are counted, not decoded
_ALIGNMENT = 32  # GGUF's default data alignment


class _Skipped:
    """A long array that was skipped; only its length is known."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _short_f32(v: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-6 as 9.99999997e-07)."""
    for p in range(1, 10):
        x = float(f"{v:.{p}g}")
        if struct.unpack("<f", struct.pack("<f", x))[0] == v:
            return x
    return v


class _Cursor:
    def __init__(self, buf: Any, order: str) -> None:
        self.buf, self.pos, self.order = buf, 0, order

    def take(self, fmt: str) -> Any:
        st = struct.Struct(self.order + fmt)
        v = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return v

    def string(self, decode: bool = True) -> str | None:
        n = self.take("Q")
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise struct.error("string runs past the end of the file")
        return bytes(self.buf[start:self.pos]).decode("utf-8") if decode else None

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            v = self.take(_SCALAR[vtype])
            return _short_f32(v) if vtype == _FLOAT32 else v
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, n = self.take("I"), self.take("Q")
        if etype in _SCALAR and n > _LONG:
            self.pos += n * struct.calcsize(_SCALAR[etype])
            if self.pos > len(self.buf):
                raise struct.error("array runs past the end of the file")
            return _Skipped(n)
        if etype == _STRING and n > _LONG:
            for _ in range(n):
                self.string(decode=False)
            return _Skipped(n)
        return [self.value(etype) for _ in range(n)]


def _read_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int, int]:
    """(metadata, tensors as (name, shape in ggml order, ggml type, offset), data start, file size)."""
    with path.open("rb") as f:
        size = path.stat().st_size
        if size < 24:
            raise ValueError(f"{size} bytes is too short for a header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
            c = _Cursor(buf, order)
            c.pos = 4
            version = c.take("I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported")
            n_tensors, n_kv = c.take("Q"), c.take("Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string() or ""
                meta[key] = c.value(c.take("I"))
            tensors = []
            for _ in range(n_tensors):
                name = c.string() or ""
                dims = tuple(c.take("Q") for _ in range(c.take("I")))
                tensors.append((name, dims, c.take("I"), c.take("Q")))
            align = int(meta.get("general.alignment", _ALIGNMENT)) or _ALIGNMENT
            return meta, tensors, -(-c.pos // align) * align, size
        finally:
            buf.close()


def read_gguf(path: Path) -> "ModelSource":
    from graphir.models.sources import ModelSource

    try:
        meta, table, data_start, size = _read_header(path)
    except (ValueError, struct.error, OverflowError, OSError, MemoryError) as e:
        # short or corrupt headers end in struct errors or bad lengths
        raise ConfigError(f"{path}: not a readable GGUF file (truncated or corrupt: {str(e).splitlines()[0][:120]})") \
            from None
    tensors: dict[str, tuple[tuple[int, ...], DType]] = {}
    end = 0
    for name, ne, type_id, offset in table:
        try:
            dt = from_ggml(type_id)
        except DTypeError as e:
            raise ConfigError(f"{path}: tensor {name}: {e}") from None
        numel = 1
        for x in ne:
            numel *= x
        end = max(end, data_start + offset + dt.nbytes(numel))
        # GGUF stores ggml's ne order (fastest dim first); graphir uses torch's order
        tensors[name] = (tuple(reversed(ne)), dt)
    if end > size:
        raise ConfigError(f"{path}: truncated GGUF: tensor data needs {end} bytes, file has {size}")
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
    if arch in ("qwen3moe", "qwen3next"):
        d.update(num_experts=k("expert_count", 0), num_experts_per_tok=k("expert_used_count", 0),
                 moe_intermediate_size=k("expert_feed_forward_length", 0),
                 shared_expert_intermediate_size=k("expert_shared_feed_forward_length", 0),
                 norm_topk_prob=bool(k("expert_weights_norm", True)))  # llama.cpp always normalises here
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
    _, table, _, _ = _read_header(path)
    return {name: tuple(reversed(ne)) for name, ne, _, _ in table}
