"""Which storage type each weight gets: uniform, a llama.cpp / ik_llama.cpp file type, or per
tensor (a GGUF's own tensor table).

File types (Q4_K_M, IQ4_XS, IQ4_KS, ...) are not uniform: `llama_tensor_get_type` bumps some
tensors (output, attn_v, ffn_down in some layers) to more bits and leaves norms, routers and
recurrent parameters in f32. The rules below follow that function (llama.cpp's for the mainline
file types, ik_llama.cpp's llama-quantize.cpp for ik's) for the tensors our architectures have.
APPROXIMATIONS: the rules see a tensor's name and shape only, so
- choices that depend on the expert count (ik and llama.cpp put attn_v in q8_0 and attn_output
  in q5_k for models with >= 4 experts), on an imatrix, on the model size class or the vocabulary,
  and on tied embeddings (token_embd then takes the output type) are not made;
- ik's attn_v bumps by GQA ratio estimate the ratio from attn_v's own shape (hidden / kv width),
  exact when n_head * head_dim == hidden;
- ffn_down bumps count layers where llama-quantize counts ffn_down tensors;
- the `_S/_M/_L` variants of Q3_K, IQ3_KL and the `_R4` file types are absent (a repacked
  ggml type such as iq4_ks_r4 works as a uniform `--quant`).
Byte totals are within a few percent of real files, not exact; `--quant FILE.gguf` (or the
model being a GGUF) gives the exact table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from graphir.dtypes import DType, dtype, fit_to_row

# tensors never quantised by llama.cpp (kept f32): norms, biases, routers, recurrent params
_KEEP_F32 = re.compile(r"(_norm|\.bias$|ffn_gate_inp|ssm_a$|ssm_dt|ssm_conv1d|ssm_norm|rope_freqs|attn_sinks)")

# file type -> (base type, output.weight type, token_embd type or None for base)
FILE_TYPES: dict[str, tuple[str, str, str | None]] = {
    "F32": ("f32", "f32", None), "F16": ("f16", "f16", None), "BF16": ("bf16", "bf16", None),
    "Q8_0": ("q8_0", "q8_0", None), "Q4_0": ("q4_0", "q6_k", None), "Q4_1": ("q4_1", "q6_k", None),
    "Q5_0": ("q5_0", "q6_k", None), "Q5_1": ("q5_1", "q6_k", None),
    "Q2_K": ("q2_k", "q6_k", None), "Q3_K_M": ("q3_k", "q6_k", None), "Q4_K_S": ("q4_k", "q6_k", None),
    "Q4_K_M": ("q4_k", "q6_k", None), "Q5_K_S": ("q5_k", "q6_k", None), "Q5_K_M": ("q5_k", "q6_k", None),
    "Q6_K": ("q6_k", "q6_k", None), "IQ2_XXS": ("iq2_xxs", "q5_k", "q2_k"), "IQ2_XS": ("iq2_xs", "q5_k", "q2_k"),
    "IQ3_XXS": ("iq3_xxs", "q5_k", "q4_k"), "IQ4_NL": ("iq4_nl", "q6_k", None), "IQ4_XS": ("iq4_xs", "q6_k", None),
    "MXFP4": ("mxfp4", "q8_0", "q8_0"), "MXFP4_MOE": ("mxfp4", "q8_0", "q8_0"),
    # ik_llama.cpp's file types (llama-quantize.cpp): output q5_k below ~3.5 bpw, else q6_k
    "Q6_0": ("q6_0", "q6_k", None), "Q8_KV": ("q8_kv", "q8_kv", None),
    "IQ1_BN": ("iq1_bn", "q6_k", "iq4_nl"), "IQ2_BN": ("iq2_bn", "q6_k", "iq4_nl"),
    "IQ2_K": ("iq2_k", "q5_k", None), "IQ3_K": ("iq3_k", "q5_k", None), "IQ4_K": ("iq4_k", "q6_k", None),
    "IQ5_K": ("iq5_k", "q6_k", None), "IQ6_K": ("iq6_k", "iq6_k", None),
    "IQ2_KS": ("iq2_ks", "q5_k", None), "IQ3_KS": ("iq3_ks", "q5_k", None), "IQ2_KL": ("iq2_kl", "q5_k", None),
    "IQ4_KS": ("iq4_ks", "q6_k", None), "IQ4_KSS": ("iq4_kss", "q6_k", None), "IQ5_KS": ("iq5_ks", "q6_k", None),
    "IQ1_KT": ("iq1_kt", "q5_k", None), "IQ2_KT": ("iq2_kt", "q5_k", None), "IQ3_KT": ("iq3_kt", "q5_k", "iq3_s"),
    "IQ4_KT": ("iq4_kt", "q6_k", None),
}

# ik_llama.cpp's attn_v choice by GQA ratio: (minimum ratio, type), the first that holds wins
_IK_ATTN_V: dict[str, tuple[tuple[int, str], ...]] = {
    "IQ2_K": ((2, "iq4_k"), (1, "iq3_k")), "IQ2_KS": ((4, "iq4_k"), (2, "iq3_k"), (1, "q2_k")),
    "IQ2_KT": ((4, "iq4_k"), (2, "iq3_k"), (1, "q2_k")), "IQ3_K": ((2, "iq4_k"),), "IQ3_KS": ((2, "iq4_ks"),),
    "IQ2_KL": ((2, "iq4_ks"),), "IQ3_KT": ((4, "iq4_k"), (1, "iq3_k")), "IQ4_KT": ((4, "iq5_k"), (1, "iq4_k")),
    "IQ4_KS": ((2, "iq5_k"),), "IQ4_KSS": ((2, "iq5_k"),), "IQ4_K": ((2, "iq5_k"),),
}
# ik_llama.cpp's ffn_down type in the first eighth of the layers
_IK_FFN_DOWN_FIRST = {"IQ2_KS": "q2_k", "IQ2_KT": "iq3_k"}

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
        if dt.repacked and tensor.startswith("token_embd."):
            return fit_to_row(dtype(dt.base), shape[-1])  # ik: embeddings cannot be row-interleaved
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
        i, role = (int(m.group(1)), m.group(2)) if m else (-1, "")
        if tensor.startswith("output."):
            # both llama_tensor_get_type versions: q8_0 when rows are not whole 256-wide super-blocks
            chosen = out_t if shape[-1] % 256 == 0 else dtype("q8_0")
        elif tensor.startswith("token_embd."):
            chosen = embd_t
        elif key == "MXFP4_MOE":  # llama.cpp: the experts (3-D tensors) MXFP4, every other matrix q8_0
            chosen = base if len(shape) == 3 else dtype("q8_0")
        elif medium:
            if role in ("attn_v", "ffn_down", "ffn_down_exps", "ffn_down_shexp") and _use_more_bits(i, n_layer):
                chosen = dtype("q6_k")
        elif key == "Q4_K_S" and role in ("attn_v", "ffn_down") and 0 <= i < n_layer // 8:
            chosen = dtype("q5_k")
        elif role == "attn_v" and key in _IK_ATTN_V:
            gqa = shape[-1] // max(1, shape[0])  # [kv heads * head_dim, hidden]
            chosen = next((dtype(t) for g, t in _IK_ATTN_V[key] if gqa >= g), base)
        elif role.startswith("ffn_down") and key in _IK_FFN_DOWN_FIRST and 0 <= i < n_layer // 8:
            chosen = dtype(_IK_FFN_DOWN_FIRST[key])
        return fit_to_row(chosen, shape[-1])

    return QuantScheme(key, rule)


def per_tensor(types: Mapping[str, DType], fallback: QuantScheme, label: str = "gguf",
               fit_rows: bool = False) -> QuantScheme:
    """Types read from a GGUF tensor table; names it lacks fall back to `fallback`. With
    `fit_rows`, a type whose blocks do not divide the graph's row (a table written for another
    model) falls back by row as the quantiser would."""
    table = dict(types)

    def rule(tensor: str, shape: tuple[int, ...], n_layer: int) -> DType:
        if tensor not in table:
            return fallback(tensor, shape, n_layer)
        return fit_to_row(table[tensor], shape[-1]) if fit_rows and shape else table[tensor]

    return QuantScheme(label, rule)


def gguf_types(types: Mapping[str, DType], label: str = "gguf") -> QuantScheme:
    """A GGUF's tensor table as a scheme; names it lacks get its most common matrix type."""
    counts: dict[str, int] = {}
    for dt in types.values():
        if dt.name != "f32":  # f32 holds the vectors and routers, not the matrices
            counts[dt.name] = counts.get(dt.name, 0) + 1
    common = max(sorted(counts), key=counts.__getitem__) if counts else "f32"
    return per_tensor(types, uniform(common), label, fit_rows=True)


def from_gguf(path: str | Path) -> QuantScheme:
    """`--quant FILE.gguf`: the file's tensor table, read from its header alone."""
    from graphir.models.gguf_header import read_header

    return gguf_types(read_header(path).types(), label=f"gguf:{Path(path).name}")


def scheme(spec: str | DType | QuantScheme | None, default: str = "bf16") -> QuantScheme:
    """Parse a user's `--quant`: a file type (Q4_K_M, IQ4_KS), a ggml type (q8_0, iq4_ks_r4), a float
    type, or a GGUF file whose per-tensor types are taken."""
    if isinstance(spec, QuantScheme):
        return spec
    if spec is None:
        return uniform(default)
    if isinstance(spec, DType):
        return uniform(spec)
    if spec.strip().lower().endswith(".gguf"):
        return from_gguf(spec.strip())
    key = spec.upper().removeprefix("MOSTLY_")
    if key in FILE_TYPES and key not in ("F32", "F16", "BF16"):
        return file_type(key)
    return uniform(spec)
