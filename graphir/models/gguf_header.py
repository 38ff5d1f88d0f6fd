"""A GGUF file's header, read without touching tensor data.

GGUF (v2/v3): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the metadata
pairs (key string, u32 value type, value; arrays carry an element type and a u64 length),
then per tensor: name, u32 n_dims, n_dims u64 dims (ggml order: fastest first), u32 ggml type
id, u64 offset into the data section, which starts at the next multiple of
`general.alignment` (32 by default). Strings are a u64 length and UTF-8 bytes.

Why not `gguf.GGUFReader`: it raises on type ids it does not know (every ik_llama.cpp type),
and it builds a numpy view per array element, seconds for a real tokenizer. Here the header
is walked with `struct` over an mmap (only the pages holding the header are read), long arrays
such as the tokenizer's 150k tokens are skipped, not decoded, and nothing is ever unpickled.
Any fault is one GGUFError line naming the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from graphir.dtypes import DType, DTypeError, from_ggml
from graphir.models.config import ConfigError

# GGUF value type -> struct format (8 = string, 9 = array are handled apart)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_LONG = 4096  # arrays longer than this (tokenizer tables) are counted, not decoded
_ALIGNMENT = 32  # GGUF's default data alignment
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


class GGUFError(ConfigError):
    """A file that is not a readable GGUF header; the message is one line naming the file."""


class Skipped:
    """A long metadata array that was skipped; only its length is known."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # dims in ggml order (fastest first), as the file stores them
    dtype: DType
    offset: int  # from the start of the data section

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order ([out, in] for a weight), the order graphir uses."""
        return tuple(reversed(self.ne))

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data: whole rows of ne[0], each with its row meta data."""
        if not self.ne:
            return self.dtype.row_bytes(1)
        rows = 1
        for x in self.ne[1:]:
            rows *= x
        return rows * self.dtype.row_bytes(self.ne[0])


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_start: int  # file offset of the data section
    file_size: int

    def types(self) -> dict[str, DType]:
        return {t.name: t.dtype for t in self.tensors}

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensor data (no alignment padding)."""
        return sum(t.nbytes for t in self.tensors)


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
            return Skipped(n)
        if etype == _STRING and n > _LONG:
            for _ in range(n):
                self.string(decode=False)
            return Skipped(n)
        return [self.value(etype) for _ in range(n)]


def _walk(buf: Any) -> tuple[int, dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(version, metadata, tensors as (name, ne, type id, offset), end of the tensor table)."""
    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # a big-endian file's version reads huge
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
    table = []
    for _ in range(n_tensors):
        name = c.string() or ""
        n_dims = c.take("I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dims, ggml allows {_MAX_DIMS}")
        ne = tuple(c.take("Q") for _ in range(n_dims))
        table.append((name, ne, c.take("I"), c.take("Q")))
    return version, meta, table, c.pos


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's header and tensor table; check the data section is all there."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        size = path.stat().st_size
        if size < 24:
            raise ValueError(f"{size} bytes is too short for a header")
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            version, meta, table, end = _walk(buf)
    except (ValueError, struct.error, OverflowError, OSError, MemoryError) as e:
        # a short or corrupt header ends in a struct error or a bad length
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt: {str(e).splitlines()[0][:120]})") \
            from None
    try:
        align = int(meta.get("general.alignment", _ALIGNMENT)) or _ALIGNMENT
    except (TypeError, ValueError):
        raise GGUFError(f"{path}: general.alignment is {meta.get('general.alignment')!r}, not a number") from None
    data_start = -(-end // align) * align
    tensors = []
    for name, ne, type_id, offset in table:
        try:
            dt = from_ggml(type_id)
        except DTypeError as e:
            raise GGUFError(f"{path}: tensor {name}: {e} (neither ggml nor ik_llama.cpp has it)") from None
        tensors.append(TensorInfo(name, ne, dt, offset))
    need = max((data_start + t.offset + t.nbytes for t in tensors), default=data_start)
    if need > size:
        raise GGUFError(f"{path}: truncated GGUF: tensor data needs {need} bytes, file has {size}")
    return GGUFHeader(path, version, meta, tuple(tensors), data_start, size)
