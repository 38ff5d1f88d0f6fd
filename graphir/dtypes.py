"""Element types: plain floats/ints and the GGUF quantisation types.

Block sizes and bytes per block come from the `gguf` package's constants, so a new
quant type in ggml is one line away and the numbers can never drift from the file format.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphir.errors import GraphirError
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType


class DTypeError(GraphirError):
    """An unknown type name."""


@dataclass(frozen=True)
class DType:
    name: str  # canonical lower-case name used in the text form: f32, bf16, q4_k, iq4_xs
    block_size: int  # elements per block (1 for plain types)
    type_size: int  # bytes per block
    ggml: int | None  # GGMLQuantizationType value, None for types ggml lacks (bool)
    is_float: bool  # a plain floating type that a kernel computes in
    is_quant: bool  # block-quantised storage type (weights, KV cache)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def nbytes(self, n_elements: int) -> int:
        """Storage bytes of n elements; n must be a multiple of the block size for quant types."""
        blocks = -(-n_elements // self.block_size)
        return blocks * self.type_size

    def __str__(self) -> str:
        return self.name


_PLAIN_FLOATS = {"F32", "F16", "BF16", "F64"}


def _build() -> dict[str, DType]:
    table: dict[str, DType] = {}
    for t in GGMLQuantizationType:
        if t not in GGML_QUANT_SIZES:
            continue
        block, size = GGML_QUANT_SIZES[t]
        plain = block == 1
        table[t.name.lower()] = DType(
            name=t.name.lower(),
            block_size=block,
            type_size=size,
            ggml=int(t.value),
            is_float=t.name in _PLAIN_FLOATS,
            is_quant=not plain,
        )
    table["bool"] = DType("bool", 1, 1, None, False, False)
    return table


DTYPES: dict[str, DType] = _build()

F32 = DTYPES["f32"]
F16 = DTYPES["f16"]
BF16 = DTYPES["bf16"]
I32 = DTYPES["i32"]
I64 = DTYPES["i64"]
Q8_0 = DTYPES["q8_0"]


def dtype(name: str | DType) -> DType:
    """Look a type up by name, case-insensitively (`IQ4_XS`, `iq4_xs`, `bf16`)."""
    if isinstance(name, DType):
        return name
    key = name.strip().lower()
    if key in DTYPES:
        return DTYPES[key]
    raise DTypeError(f"unknown type {name!r}; known: {', '.join(sorted(DTYPES))}")


def from_ggml(value: int) -> DType:
    """The DType of a GGMLQuantizationType value as stored in a GGUF tensor table."""
    for dt in DTYPES.values():
        if dt.ggml == value:
            return dt
    raise DTypeError(f"unknown ggml type id {value}")


# Fallbacks llama.cpp uses when a row length is not a multiple of a 256-wide super-block.
_FALLBACK_32 = {
    "q2_k": "iq4_nl", "q3_k": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
    "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "tq1_0": "iq4_nl",
    "tq2_0": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl",
}


def fit_to_row(dt: DType, row_len: int) -> DType:
    """The type llama.cpp actually stores for a row of `row_len` when `dt` does not divide it."""
    if row_len % dt.block_size == 0:
        return dt
    alt = DTYPES.get(_FALLBACK_32.get(dt.name, ""), None)
    if alt is not None and row_len % alt.block_size == 0:
        return alt
    return F16
