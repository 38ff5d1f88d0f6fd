"""Write a model config as a GGUF file in llama.cpp's converter layout, with random weights.

The tensor table is the graph's weight leaves (the same names and shapes the GGUF reader
checks against llama.cpp's table), stored in ggml's `ne` order. Metadata carries the keys
llama.cpp / ik_llama.cpp read for each architecture, and `tokenizer.ggml.model = none`
with `{arch}.vocab_size`, so no vocabulary is needed: engines that only time (llama-sweep-bench
draws random token ids) load the file as is.

Weights are random and deterministic per (seed, tensor name), so a file of 8 layers holds the
same first 8 layers as the full model's file. Block-quantised types are written as random
blocks directly (random quant bytes, small finite scale fields at the type's real offsets):
no quantiser runs, and writing streams tensor by tensor in bounded chunks, so a 16 GB file
needs neither 16 GB of RAM nor minutes of CPU.

The file format is written here with `struct` rather than `gguf.GGUFWriter` because the
writer must also emit ik_llama.cpp's own types (IQ4_KS), which the gguf package does not
know, and must stream tensor data of any size.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

import numpy as np

from graphir.dtypes import DType, dtype
from graphir.models.config import ConfigError, ModelConfig
from graphir.models.gguf_metadata import ALIGNMENT, GGUF_ARCH, extra_arrays, metadata  # noqa: F401 (re-exported)
from graphir.models.weights import WeightInfo, reference_weights

SIGMA = 0.02  # standard deviation of the random matrices (and the target of the quant scales)
_POOL_BYTES = 1 << 21  # exact random rows per tensor; larger tensors repeat them at random row offsets


@dataclass(frozen=True)
class StorageType:
    """A ggml storage type as the writer fills it with random blocks: where its scale fields sit
    (ggml-common.h); ids and sizes are graphir.dtypes'."""

    name: str
    scales: tuple[tuple[int, float], ...] = ()  # (byte offset, value) of the block's f16 scale fields
    row_scale: float = 0.0  # ik_llama.cpp row-wise types: the value of the f32 scale in front of every row

    @property
    def dtype(self) -> DType:
        return dtype(self.name)

    @property
    def ggml(self) -> int:  # ggml_type id in the tensor table
        return int(self.dtype.ggml)  # type: ignore[arg-type]

    @property
    def block(self) -> int:  # elements per block
        return self.dtype.block_size

    @property
    def size(self) -> int:  # bytes per block
        return self.dtype.type_size

    def row_bytes(self, n: int) -> int:
        return self.dtype.row_bytes(n)


# Scales: SIGMA / rms(dequantised value at scale 1) for uniformly random quant bytes, so the
# weights are about the size of N(0, 0.02) matrices (checked in tests with gguf.quants).
TYPES: dict[str, StorageType] = {t.name: t for t in (
    StorageType("f32"),
    StorageType("f16"),
    StorageType("bf16"),
    StorageType("q4_0", ((0, SIGMA / 4.6),)),  # d, 16 bytes of nibbles (q - 8)
    StorageType("q5_0", ((0, SIGMA / 9.2),)),  # d, qh[4], qs[16] (q - 16)
    StorageType("q8_0", ((0, SIGMA / 74.0),)),  # d, 32 int8
    StorageType("q4_k", ((0, SIGMA / 265.0), (2, 7.5 * SIGMA / 265.0))),  # d, dmin (mean 0), 12 bytes of 6-bit scales/mins, qs
    StorageType("q6_k", ((208, SIGMA / 1400.0),)),  # ql, qh, int8 scales[16], then d at the end
    StorageType("iq4_nl", ((0, SIGMA / 68.0),)),  # d, 16 bytes of indices into kvalues_iq4nl
    StorageType("iq4_xs", ((0, SIGMA / 1300.0),)),  # d, scales_h, scales_l[4], qs[128]
    # e (an E8M0 exponent byte), qs[16] E2M1 pairs: random bytes, the exponent set below
    StorageType("mxfp4"),
    # ik_llama.cpp: an f32 row scale, then blocks of scales[8] ((s & 254) - 127) and qs[128]
    StorageType("iq4_ks", row_scale=SIGMA / 5000.0),
)}
_FLOAT32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight", ".bias")  # never quantised


def storage_type(name: str) -> StorageType:
    try:
        return TYPES[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown weight type {name!r}; the writer knows {', '.join(TYPES)}") from None


# one weight of the file: name, torch shape ([out, in]), rms-norm role (llama.cpp stores w + 1
# for zero-centred norms)
TensorSpec = WeightInfo


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every weight of the config, in graph order (graphir.models.weights), and the tensors
    llama.cpp's converter adds that no graph node reads (Gemma 4's rope_freqs)."""
    return list(reference_weights(cfg).values()) + [WeightInfo(n, a.shape) for n, a in extra_arrays(cfg).items()]


def type_for(spec: TensorSpec, wtype: StorageType) -> StorageType:
    """llama.cpp's choice for one tensor when a file is of type `wtype`: vectors, routers and
    the conv kernel stay f32; rows a block does not divide fall back to f16."""
    if len(spec.shape) == 1 or spec.name.endswith(_FLOAT32):
        return TYPES["f32"]
    if spec.shape[-1] % wtype.block:
        return TYPES["f16"]
    return wtype


# ---- random tensor data -------------------------------------------------------------------

def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _float_values(spec: TensorSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """n float32 values as llama.cpp stores this tensor (norms near 1, ssm_a negative)."""
    if spec.name.endswith("ssm_a"):
        return -(0.5 + 1.5 * rng.random(n, dtype=np.float32))  # -exp(A_log): decays in (-2, -0.5)
    x = rng.standard_normal(n, dtype=np.float32)
    if spec.norm_offset is not None:
        return 1.0 + 0.1 * x  # stored norm weights are ~1 (zero-centred ones hold w + 1)
    if spec.name.endswith("ssm_dt.bias"):
        return 0.1 * x
    return SIGMA * x


def _encode_floats(x: np.ndarray, t: StorageType) -> bytes:
    if t.name == "f32":
        return x.astype("<f4").tobytes()
    if t.name == "f16":
        return x.astype("<f2").tobytes()
    u = x.astype("<f4").view("<u4")  # bf16: round to nearest even on the upper 16 bits
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def _random_blocks(n_blocks: int, t: StorageType, rng: np.random.Generator) -> np.ndarray:
    """[n_blocks, size] random bytes with the f16 scale fields set to small finite values."""
    b = rng.integers(0, 256, size=(n_blocks, t.size), dtype=np.uint8)
    if t.name == "mxfp4":  # 2^(e-128) times E2M1 values up to 6: e = 120 gives |w| <= 0.023
        b[:, 0] = 120
    for off, scale in t.scales:
        d = (scale * (0.75 + 0.5 * rng.random(n_blocks))).astype("<f2")
        b[:, off:off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return b


def _random_chunks(spec: TensorSpec, t: StorageType, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The tensor's bytes: a pool of exact random rows (about _POOL_BYTES), then, for tensors
    larger than the pool, the pool again rotated by a random number of rows per pass. Drawing
    8 billion distinct values would take minutes of CPU; a timing run needs none of them."""
    row = spec.shape[-1]
    rows = int(np.prod(spec.shape)) // row
    unit = t.row_bytes(row)
    k = min(rows, max(1, _POOL_BYTES // unit))
    if t.block == 1:
        pool = np.frombuffer(_encode_floats(_float_values(spec, k * row, rng), t), np.uint8)
    else:
        pool = _random_blocks(k * (row // t.block), t, rng).reshape(k, -1)
        if t.row_scale:
            d = (t.row_scale * (0.75 + 0.5 * rng.random(k))).astype("<f4").view(np.uint8).reshape(k, 4)
            pool = np.concatenate([d, pool], axis=1)
        pool = pool.reshape(-1)
    left = rows
    while left:
        o = int(rng.integers(k)) * unit if left < rows else 0
        for piece in (pool[o:], pool[:o]):
            piece = piece[:left * unit]
            if piece.size:
                yield piece
                left -= piece.size // unit


def _given_chunks(spec: TensorSpec, t: StorageType, a: np.ndarray) -> Iterator[bytes | np.ndarray]:
    """A caller's array: floats are converted to the storage type, uint8 arrays are its blocks."""
    if a.dtype == np.uint8:
        if t.block == 1 or a.size != _nbytes(spec.shape, t):
            raise ConfigError(f"{spec.name}: {a.size} bytes of blocks do not make a {t.name} {list(spec.shape)}")
        yield np.ascontiguousarray(a).tobytes()
        return
    if tuple(a.shape) != spec.shape:
        raise ConfigError(f"{spec.name}: array of shape {list(a.shape)}, the config needs {list(spec.shape)}")
    if t.block != 1:
        raise ConfigError(f"{spec.name}: a float array cannot be stored as {t.name} (pass its blocks as uint8)")
    yield _encode_floats(np.asarray(a, dtype=np.float32).reshape(-1), t)


def _nbytes(shape: tuple[int, ...], t: StorageType) -> int:
    numel = int(np.prod(shape))
    return numel // shape[-1] * t.row_bytes(shape[-1])


# ---- the file -----------------------------------------------------------------------------

def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, v: Any) -> bytes:
    if isinstance(v, bool):
        return _s(key) + struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return _s(key) + struct.pack("<II", 4, v)
    if isinstance(v, float):
        return _s(key) + struct.pack("<If", 6, v)
    if isinstance(v, list) and v and all(isinstance(x, bool) for x in v):  # gemma4's sliding_window_pattern
        return _s(key) + struct.pack("<IIQ", 9, 7, len(v)) + struct.pack(f"<{len(v)}?", *v)
    if isinstance(v, list):  # an array of int32, as llama.cpp's converter writes rope.dimension_sections
        return _s(key) + struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    return _s(key) + struct.pack("<I", 8) + _s(str(v))


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def write_gguf(path: str | Path, cfg: ModelConfig, *, wtype: str = "f16", seed: int = 0,
               types: Mapping[str, str] | None = None, arrays: Mapping[str, np.ndarray] | None = None,
               progress: Callable[[str, int], None] | None = None) -> dict[str, str]:
    """Write `cfg` as a GGUF file; returns the storage type of every tensor by name.

    wtype: the matrices' type (vectors, routers and conv kernels stay f32); `types` overrides it
    per tensor. arrays: tensor data in llama.cpp's layout by name (float arrays, or uint8 blocks
    of the tensor's type); tensors not given are random for `seed`. The file appears only when
    complete (written to a temporary name, then renamed).
    """
    return write_specs(path, cfg, tensor_specs(cfg), wtype=wtype, seed=seed, types=types, arrays=arrays,
                       progress=progress)


def write_specs(path: str | Path, cfg: ModelConfig, specs: list[TensorSpec], *, wtype: str = "f16", seed: int = 0,
                types: Mapping[str, str] | None = None, arrays: Mapping[str, np.ndarray] | None = None,
                progress: Callable[[str, int], None] | None = None) -> dict[str, str]:
    """`write_gguf` with a tensor table of the caller's choosing (a subset, for files that must
    lack a tensor)."""
    if cfg.arch not in GGUF_ARCH:
        raise ConfigError(f"no GGUF layout for architecture {cfg.arch!r}; supported: {', '.join(GGUF_ARCH)}")
    base = storage_type(wtype)
    names = {s.name for s in specs}
    given = {**{k: v for k, v in extra_arrays(cfg).items() if k in names}, **dict(arrays or {})}
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"arrays for tensors the config does not have: {', '.join(unknown)}")
    chosen = {s.name: storage_type(types[s.name]) if types and s.name in types else type_for(s, base) for s in specs}
    for s in specs:
        if s.shape[-1] % chosen[s.name].block:
            raise ConfigError(f"{s.name}: rows of {s.shape[-1]} are not whole {chosen[s.name].name} blocks")

    kvs = metadata(cfg, file_type=base.name)
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(specs), len(kvs)))
    for k, v in kvs:
        head += _kv(k, v)
    offset = 0
    for s in specs:
        t = chosen[s.name]
        ne = tuple(reversed(s.shape))  # ggml order: fastest dimension first
        head += _s(s.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.ggml, offset)
        offset += _nbytes(s.shape, t) + _pad(_nbytes(s.shape, t))
    head += b"\0" * _pad(len(head))

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("wb") as f:
            f.write(head)
            for s in specs:
                t = chosen[s.name]
                chunks = _given_chunks(s, t, given[s.name]) if s.name in given else \
                    _random_chunks(s, t, _rng(seed, s.name))
                _write_tensor(f, s, t, chunks)
                if progress is not None:
                    progress(s.name, _nbytes(s.shape, t))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {s.name: chosen[s.name].name for s in specs}


def _write_tensor(f: IO[bytes], spec: TensorSpec, t: StorageType, chunks: Iterator[bytes | np.ndarray]) -> None:
    need, n = _nbytes(spec.shape, t), 0
    for c in chunks:
        f.write(c)  # numpy pieces are written from their buffers, without a copy
        n += len(c) if isinstance(c, bytes) else c.nbytes
    if n != need:  # a bug in a generator, never the caller's data (checked before)
        raise AssertionError(f"{spec.name}: wrote {n} bytes, the table says {need}")
    f.write(b"\0" * _pad(n))


def file_size(cfg: ModelConfig, wtype: str = "f16") -> int:
    """Bytes `write_gguf` will write for the tensor data (the header adds a few kB)."""
    base = storage_type(wtype)
    return sum(_nbytes(s.shape, type_for(s, base)) for s in tensor_specs(cfg))
