"""Element types: plain floats/ints and the GGUF quantisation types, mainline and ik_llama.cpp's.

Mainline block sizes and bytes per block come from the `gguf` package's constants, so a new
quant type in ggml is one line away and the numbers can never drift from the file format.
ik_llama.cpp's own types (`_IK` below) are facts of its format: ids from its `ggml.h`, block
sizes and block bytes from `ggml-common.h`, per-row meta data from `ggml.c`'s type traits.
Several ik types store a few bytes in front of every row (a float or half row scale), so a
row's size is `row_meta_bytes + blocks * type_size`, and bits per weight depend on the row
length: `bits_per_weight` quotes a 4096-wide row, the way ik's documentation does.

Type ids: ik reads a GGUF's type ids literally (no remapping), and the ids the two projects
share name the same format. No id in the table below collides with one the gguf package
knows: ik's 31-33 (Q4_0_4_4 ...) were mainline ids later dropped there; mainline's TQ1_0/TQ2_0
(34, 35) and NVFP4 (40) are unknown to ik; ik's Q1_0_G128 (41) is mainline's Q1_0, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphir.errors import GraphirError
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# What kind of kernel a type needs, as a fact about its format (the cost model keys rates on it):
#   float   plain floats                  int      plain integers (indices, masks)
#   legacy  32-wide blocks, one scale     k        256-wide k-quants with sub-block scales
#   iq      mainline codebook types       ik       ik's non-linear k-like types (iq2_k ... iq6_k, _ks/_kss/_kl)
#   trellis ik's *_kt trellis types       bitnet   ternary types        mx   micro-scaled floats
FAMILIES = ("float", "int", "legacy", "k", "iq", "ik", "trellis", "bitnet", "mx")


class DTypeError(GraphirError):
    """An unknown type name."""


@dataclass(frozen=True)
class DType:
    name: str  # canonical lower-case name used in the text form: f32, bf16, q4_k, iq4_xs
    block_size: int  # elements per block (1 for plain types)
    type_size: int  # bytes per block
    ggml: int | None  # ggml type id as stored in a GGUF tensor table, None for types ggml lacks (bool)
    is_float: bool  # a plain floating type that a kernel computes in
    is_quant: bool  # block-quantised storage type (weights, KV cache)
    family: str = "float"  # one of FAMILIES
    row_meta_bytes: int = 0  # bytes stored in front of every row (ik's per-row scales)
    base: str = ""  # the type a repacked (row-interleaved) type was made from; "" when not repacked

    @property
    def repacked(self) -> bool:
        """ik's row-interleaved variants (`_r4`, `_r8`, ...): same bits, other kernels."""
        return bool(self.base)

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of `n_cols` elements (whole blocks plus the row's meta data)."""
        return self.row_meta_bytes + -(-n_cols // self.block_size) * self.type_size

    def nbytes(self, n_elements: int, n_cols: int | None = None) -> int:
        """Storage bytes of `n_elements` stored as rows of `n_cols` (default: one row)."""
        if n_cols is None or n_cols == n_elements:
            return self.row_bytes(n_elements)
        return -(-n_elements // n_cols) * self.row_bytes(n_cols)  # whole rows

    def bits_per_weight_at(self, n_cols: int) -> float:
        return 8.0 * self.row_bytes(n_cols) / n_cols

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of a typical 4096-wide row (row meta data included)."""
        return self.bits_per_weight_at(4096)

    def __str__(self) -> str:
        return self.name


_PLAIN_FLOATS = {"F32", "F16", "BF16", "F64"}
_FAMILY = {
    "f32": "float", "f16": "float", "bf16": "float", "f64": "float",
    "i8": "int", "i16": "int", "i32": "int", "i64": "int",
    "q4_0": "legacy", "q4_1": "legacy", "q5_0": "legacy", "q5_1": "legacy", "q8_0": "legacy", "q8_1": "legacy",
    "iq4_nl": "legacy", "q1_0": "legacy",
    "q2_k": "k", "q3_k": "k", "q4_k": "k", "q5_k": "k", "q6_k": "k", "q8_k": "k",
    "iq2_xxs": "iq", "iq2_xs": "iq", "iq2_s": "iq", "iq3_xxs": "iq", "iq3_s": "iq", "iq1_s": "iq", "iq1_m": "iq",
    "iq4_xs": "iq",
    "tq1_0": "bitnet", "tq2_0": "bitnet", "mxfp4": "mx", "nvfp4": "mx",
}

# ik_llama.cpp's own types: name -> (ggml id, block size, bytes per block, row meta bytes, family, base).
# Interleaved types store R rows per block group; their per-row bytes are the base type's, except
# iq1_s_r4 / iq1_m_r4 (32-wide blocks plus a row scale), q8_k_r8 / q8_k_r16 (258 bytes per 256)
# and q8_kv_r8 (a 4-byte row header where q8_kv has 8).
_IK: dict[str, tuple[int, int, int, int, str, str]] = {
    "q4_0_4_4": (31, 32, 18, 0, "legacy", "q4_0"), "q4_0_4_8": (32, 32, 18, 0, "legacy", "q4_0"),
    "q4_0_8_8": (33, 32, 18, 0, "legacy", "q4_0"),
    "q6_0": (133, 32, 26, 0, "legacy", ""),
    "iq1_bn": (134, 64, 13, 2, "bitnet", ""), "iq2_bn": (135, 64, 16, 4, "bitnet", ""),
    "iq2_k": (137, 256, 76, 0, "ik", ""), "iq3_k": (138, 256, 110, 0, "ik", ""),
    "iq4_k": (139, 256, 144, 0, "ik", ""), "iq5_k": (140, 256, 176, 0, "ik", ""),
    "iq6_k": (141, 256, 212, 0, "ik", ""),
    "iq4_ks": (144, 256, 136, 4, "ik", ""), "iq2_ks": (145, 256, 70, 2, "ik", ""),
    "iq4_kss": (146, 256, 128, 4, "ik", ""),
    "q8_kv": (151, 32, 32, 8, "legacy", ""),  # int8 with one float scale (and sum) per row: a KV type
    "iq5_ks": (152, 256, 168, 4, "ik", ""),
    "iq2_kt": (153, 256, 68, 4, "trellis", ""), "iq3_kt": (154, 256, 100, 4, "trellis", ""),
    "iq4_kt": (155, 256, 128, 4, "trellis", ""),
    "iq3_ks": (156, 256, 102, 2, "ik", ""), "iq2_kl": (157, 256, 86, 2, "ik", ""),
    "iq1_kt": (158, 256, 56, 4, "trellis", ""),
    # row-interleaved ("repacked") variants: `llama-quantize --repack` writes them into files
    "q4_0_r8": (202, 32, 18, 0, "legacy", "q4_0"), "q5_0_r4": (206, 32, 22, 0, "legacy", "q5_0"),
    "q8_0_r8": (208, 32, 34, 0, "legacy", "q8_0"),
    "q2_k_r4": (210, 256, 84, 0, "k", "q2_k"), "q3_k_r4": (211, 256, 110, 0, "k", "q3_k"),
    "q4_k_r4": (212, 256, 144, 0, "k", "q4_k"), "q5_k_r4": (213, 256, 176, 0, "k", "q5_k"),
    "q6_k_r4": (214, 256, 210, 0, "k", "q6_k"),
    "iq2_xxs_r4": (216, 256, 66, 0, "iq", "iq2_xxs"), "iq2_xs_r4": (217, 256, 74, 0, "iq", "iq2_xs"),
    "iq3_xxs_r4": (218, 256, 98, 0, "iq", "iq3_xxs"), "iq1_s_r4": (219, 32, 6, 2, "iq", "iq1_s"),
    "iq4_nl_r4": (220, 32, 18, 0, "legacy", "iq4_nl"), "iq3_s_r4": (221, 256, 110, 0, "iq", "iq3_s"),
    "iq2_s_r4": (222, 256, 82, 0, "iq", "iq2_s"), "iq4_xs_r8": (223, 256, 136, 0, "iq", "iq4_xs"),
    "iq1_m_r4": (229, 32, 7, 2, "iq", "iq1_m"), "bf16_r16": (230, 1, 2, 0, "float", "bf16"),
    "q6_0_r4": (233, 32, 26, 0, "legacy", "q6_0"), "iq2_bn_r4": (335, 64, 16, 4, "bitnet", "iq2_bn"),
    "iq2_k_r4": (337, 256, 76, 0, "ik", "iq2_k"), "iq3_k_r4": (338, 256, 110, 0, "ik", "iq3_k"),
    "iq4_k_r4": (339, 256, 144, 0, "ik", "iq4_k"), "iq5_k_r4": (340, 256, 176, 0, "ik", "iq5_k"),
    "iq4_ks_r4": (344, 256, 136, 4, "ik", "iq4_ks"), "iq5_ks_r4": (352, 256, 168, 4, "ik", "iq5_ks"),
    "mxfp4_r8": (353, 32, 17, 0, "mx", "mxfp4"), "q8_k_r16": (397, 256, 258, 0, "k", "q8_k"),
    "q8_kv_r8": (398, 32, 32, 4, "legacy", "q8_kv"), "q8_k_r8": (399, 256, 258, 0, "k", "q8_k"),
}
_ALIASES = {"q1_0_g128": "q1_0"}  # ik's name for the same format


def _build() -> dict[str, DType]:
    table: dict[str, DType] = {}
    for t in GGMLQuantizationType:
        if t not in GGML_QUANT_SIZES:
            continue
        block, size = GGML_QUANT_SIZES[t]
        name = t.name.lower()
        table[name] = DType(name, block, size, int(t.value), is_float=t.name in _PLAIN_FLOATS,
                            is_quant=block != 1, family=_FAMILY.get(name, "legacy"))
    for name, (gid, block, size, meta, family, base) in _IK.items():
        table[name] = DType(name, block, size, gid, is_float=family == "float", is_quant=block != 1,
                            family=family, row_meta_bytes=meta, base=base)
    table["bool"] = DType("bool", 1, 1, None, False, False, family="int")
    return table


DTYPES: dict[str, DType] = _build()
_BY_ID: dict[int, DType] = {dt.ggml: dt for dt in DTYPES.values() if dt.ggml is not None}

F32 = DTYPES["f32"]
F16 = DTYPES["f16"]
BF16 = DTYPES["bf16"]
I32 = DTYPES["i32"]
I64 = DTYPES["i64"]
Q8_0 = DTYPES["q8_0"]

# The cache types ik_llama.cpp accepts for -ctk / -ctv (common.cpp's kv_cache_type_from_str).
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q6_0", "q8_kv")


def dtype(name: str | DType) -> DType:
    """Look a type up by name, case-insensitively (`IQ4_XS`, `iq4_xs`, `bf16`)."""
    if isinstance(name, DType):
        return name
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in DTYPES:
        return DTYPES[key]
    raise DTypeError(f"unknown type {name!r}; known: {', '.join(sorted(DTYPES))}")


def kv_dtype(name: str | DType) -> DType:
    """A KV cache type as `--kv-type` / ik's `-ctk` take it; other types are refused by name."""
    try:
        dt: DType | None = dtype(name)
    except DTypeError:
        dt = None
    if dt is None or dt.name not in KV_TYPES:
        raise DTypeError(f"unknown KV cache type {str(name)!r}; known: {', '.join(KV_TYPES)}")
    return dt


def from_ggml(value: int) -> DType:
    """The DType of a ggml type id as stored in a GGUF tensor table."""
    if value in _BY_ID:
        return _BY_ID[value]
    raise DTypeError(f"unknown ggml type id {value}")


# Fallbacks when a row length is not a multiple of a 256-wide super-block. Mainline types keep
# llama.cpp's choices; ik's types (and ik's repacked ones) follow ik's change_type_if_necessary.
_FALLBACK_32 = {
    "q2_k": "iq4_nl", "q3_k": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
    "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "tq1_0": "iq4_nl",
    "tq2_0": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl",
    # ik_llama.cpp
    "iq2_ks": "iq4_nl", "iq2_k": "iq4_nl", "iq2_kl": "iq4_nl", "iq3_ks": "iq4_nl", "iq3_k": "iq4_nl",
    "iq4_kss": "iq4_nl", "iq4_ks": "iq4_nl", "iq1_kt": "iq4_nl", "iq2_kt": "iq4_nl", "iq3_kt": "iq4_nl",
    "iq4_kt": "iq4_nl", "iq4_k": "q5_0", "iq5_ks": "q5_0", "iq5_k": "q6_0", "iq6_k": "q8_0",
    "q2_k_r4": "iq4_nl", "q3_k_r4": "iq4_nl", "iq2_xxs_r4": "iq4_nl", "iq2_xs_r4": "iq4_nl",
    "iq2_s_r4": "iq4_nl", "iq3_xxs_r4": "iq4_nl", "iq3_s_r4": "iq4_nl", "iq2_k_r4": "iq4_nl",
    "iq3_k_r4": "iq4_nl", "iq4_ks_r4": "iq4_nl", "iq4_xs_r8": "iq4_nl", "iq4_k_r4": "q5_0", "q4_k_r4": "q5_0",
    "iq5_ks_r4": "q5_0", "iq5_k_r4": "q6_0", "q5_k_r4": "q6_0", "q6_k_r4": "q8_0", "q8_k_r8": "q8_0",
}


def fit_to_row(dt: DType, row_len: int) -> DType:
    """The type llama.cpp / ik_llama.cpp actually stores for a row of `row_len` when `dt` does not
    divide it (f16 when no fallback does)."""
    if row_len % dt.block_size == 0:
        return dt
    alt = DTYPES.get(_FALLBACK_32.get(dt.name, ""), None)
    if alt is not None and row_len % alt.block_size == 0:
        return alt
    return F16
