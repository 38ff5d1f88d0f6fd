"""Which storage type each weight gets: uniform, a llama.cpp file type, or per tensor (GGUF).

llama.cpp's file types (Q4_K_M, IQ4_XS, ...) are not uniform: `llama_tensor_get_type`
bumps some tensors (output, attn_v, ffn_down in some layers) to more bits and leaves norms,
routers and recurrent parameters in f32. The rules below follow that function for the
tensors our architectures have. APPROXIMATION: llama.cpp has further special cases (per
GQA ratio, per expert count, imatrix-dependent choices, the `_S/_M/_L` variants of Q3_K);
the byte totals are within a few percent of real files, not exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from graphir.dtypes import DType, dtype, fit_to_row

# tensors never quantised by llama.cpp (kept f32): norms, biases, routers, recurrent params
_KEEP_F32 = re.compile(r"(_norm|\.bias$|ffn_gate_inp|ssm_a$|ssm_dt|ssm_conv1d|ssm_norm|rope_freqs)")

# file type -> (base type, output.weight type, token_embd type or None for base)
FILE_TYPES: dict[str, tuple[str, str, str | None]] = {
    "F32": ("f32", "f32", None), "F16": ("f16", "f16", None), "BF16": ("bf16", "bf16", None),
    "Q8_0": ("q8_0", "q8_0", None), "Q4_0": ("q4_0", "q6_k", None), "Q4_1": ("q4_1", "q6_k", None),
    "Q5_0": ("q5_0", "q6_k", None), "Q5_1": ("q5_1", "q6_k", None),
    "Q2_K": ("q2_k", "q6_k", None), "Q3_K_M": ("q3_k", "q6_k", None), "Q4_K_S": ("q4_k", "q6_k", None),
    "Q4_K_M": ("q4_k", "q6_k", None), "Q5_K_S": ("q5_k", "q6_k", None), "Q5_K_M": ("q5_k", "q6_k", None),
    "Q6_K": ("q6_k", "q6_k", None), "IQ2_XXS": ("iq2_xxs", "q5_k", "q2_k"), "IQ2_XS": ("iq2_xs", "q5_k", "q2_k"),
    "IQ3_XXS": ("iq3_xxs", "q5_k", "q4_k"), "IQ4_NL": ("iq4_nl", "q6_k", None), "IQ4_XS": ("iq4_xs", "q6_k", None),
    "MXFP4": ("mxfp4", "q8_0", "q8_0"),
}

_BLK = re.compile(r"blk\.(\d+)\.(.+?)(\.weight)?$")


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third one between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class QuantScheme:
    """A rule `(tensor name, shape) -> storage type`. `label` is what `stats` prints."""

    label: str
    rule: Callable[[str, tuple[int, ...], int], DType] = field(compare=False)

    def __call__(self, name: str, shape: tuple[int, ...], n_layer: int) -> DType:
        return self.rule(name, shape, n_layer)


def uniform(name: str | DType) -> QuantScheme:
    """Every tensor in one type (vectors stay f32 as in any real file)."""
    dt = dtype(name)

    def rule(tensor: str, shape: tuple[int, ...], n_layer: int) -> DType:
        if len(shape) == 1 or (dt.is_quant and _KEEP_F32.search(tensor)):
            return dtype("f32")
        return fit_to_row(dt, shape[-1])

    return QuantScheme(dt.name, rule)


def file_type(ftype: str) -> QuantScheme:
    key = ftype.upper().removeprefix("MOSTLY_")
    if key not in FILE_TYPES:
        raise ValueError(f"unknown file type {ftype!r}; known: {', '.join(FILE_TYPES)}")
    base_name, out_name, embd_name = FILE_TYPES[key]
    base, out_t = dtype(base_name), dtype(out_name)
    embd_t = dtype(embd_name) if embd_name else base
    medium = key.endswith("_M")

    def rule(tensor: str, shape: tuple[int, ...], n_layer: int) -> DType:
        if len(shape) == 1 or (base.is_quant and _KEEP_F32.search(tensor)):
            return dtype("f32")
        if not base.is_quant:
            return base
        chosen = base
        m = _BLK.match(tensor)
        if tensor.startswith("output."):
            chosen = out_t
        elif tensor.startswith("token_embd."):
            chosen = embd_t
        elif m and medium:
            i, role = int(m.group(1)), m.group(2)
            if role in ("attn_v", "ffn_down", "ffn_down_exps", "ffn_down_shexp") and _use_more_bits(i, n_layer):
                chosen = dtype("q6_k")
        elif m and key == "Q4_K_S" and m.group(2) in ("attn_v", "ffn_down") and int(m.group(1)) < n_layer // 8:
            chosen = dtype("q5_k")
        return fit_to_row(chosen, shape[-1])

    return QuantScheme(key, rule)


def per_tensor(types: Mapping[str, DType], fallback: QuantScheme, label: str = "gguf") -> QuantScheme:
    """Types read from a GGUF tensor table; names it lacks fall back to `fallback`."""
    table = dict(types)

    def rule(tensor: str, shape: tuple[int, ...], n_layer: int) -> DType:
        return table[tensor] if tensor in table else fallback(tensor, shape, n_layer)

    return QuantScheme(label, rule)


def scheme(spec: str | DType | QuantScheme | None, default: str = "bf16") -> QuantScheme:
    """Parse a user's `--quant`: a file type (Q4_K_M), a ggml type (q8_0) or a float type."""
    if isinstance(spec, QuantScheme):
        return spec
    if spec is None:
        return uniform(default)
    if isinstance(spec, DType):
        return uniform(spec)
    key = spec.upper().removeprefix("MOSTLY_")
    if key in FILE_TYPES and key not in ("F32", "F16", "BF16"):
        return file_type(key)
    return uniform(spec)
