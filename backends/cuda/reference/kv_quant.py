"""Quantised KV caches in ggml's block formats: q8_0 and q4_0, as ik_llama.cpp's `-ctk/-ctv` keep them.

A cache spec `q8_0[KV,hkv,d]` is held as its raw blocks, uint8 `[KV, hkv, d/32 * bytes]`
(34 bytes per 32 values for q8_0: an f16 scale, then 32 int8; 18 for q4_0: the scale, then 16
bytes of nibbles, element j in the low nibble of byte j and element j+16 in its high nibble).
Blocks run along the head dimension, as in ggml's cache, whose rows are a token's hkv*d values
with d a multiple of 32: a block never spans two heads, so per-head blocks are the same bytes.

`kv_append` quantises the new rows into the cache (`to_cache`) and attention reads the rows
back as floats (`floats`): the numbers attention sees are exactly ggml's round trip, since the
quantisers below are the reference ones (ggml-quants.c's, which the `gguf` package mirrors bit
for bit; a test holds them to it). Reading back dequantises the whole view in torch: correct
everywhere and capturable in a CUDA graph (no host synchronisation), not a fused kernel. The
decode step's route (a 16-bit session, one query, a bucket of the cache) is the exception:
the split decode-attention kernel (triton_kernels/decode_attention.py) reads the blocks
themselves, 34 or 18 bytes per 32 values, and dequantises them in registers to the same values.
Prefill still reads a dequantised copy.
"""

from __future__ import annotations

import torch

from graphir.dtypes import DTYPES
from graphir.errors import GraphirError

EXECUTABLE = ("q8_0", "q4_0")  # the quantised cache types the executor runs


def is_quant(name: str) -> bool:
    return name in EXECUTABLE


def check_kv_type(name: str, float_types: tuple[str, ...]) -> None:
    """Refuse, by name, a cache type the executor cannot hold (the cost model prices more)."""
    if name not in float_types and name not in EXECUTABLE:
        raise GraphirError(f"KV cache type {name} is not executable: the executor keeps caches in "
                           f"{', '.join(float_types + EXECUTABLE)}")


def stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The raw uint8 shape of a quantised cache of logical `shape` [..., d]."""
    dt = DTYPES[name]
    d = shape[-1]
    if d % dt.block_size:
        raise GraphirError(f"a {name} KV cache needs a head size that is a multiple of {dt.block_size} "
                           f"(whole blocks per head), this model's is {d}")
    return tuple(shape[:-1]) + (d // dt.block_size * dt.type_size,)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """roundf: halves away from zero (ggml's quantiser; torch.round rounds them to even)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def quantize(x: torch.Tensor, name: str) -> torch.Tensor:
    """x [..., d] float -> uint8 [..., d/32 * bytes] (ggml's reference quantiser, in f32)."""
    lead, d = x.shape[:-1], x.shape[-1]
    b = x.to(torch.float32).reshape(*lead, d // 32, 32)  # [..., nb, 32]
    if name == "q8_0":
        scale = b.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        qs = _round_away(b * inv).to(torch.int8).view(torch.uint8)  # [..., nb, 32]
    elif name == "q4_0":
        idx = b.abs().argmax(dim=-1, keepdim=True)
        scale = torch.gather(b, -1, idx) / -8  # the signed value of largest magnitude maps to -8
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8)  # [..., nb, 32]
        qs = q[..., :16] | (q[..., 16:] << 4)  # [..., nb, 16]
    else:
        raise GraphirError(f"KV cache type {name} is not executable")
    sb = scale.to(torch.float16).view(torch.uint8)  # [..., nb, 2]
    return torch.cat((sb, qs), dim=-1).reshape(*lead, -1)


def dequantize(raw: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., d/32 * bytes] -> [..., d] in `dtype` (values computed in f32, as gguf does)."""
    dt = DTYPES[name]
    lead = raw.shape[:-1]
    b = raw.reshape(*lead, -1, dt.type_size)  # [..., nb, bytes]
    scale = b[..., :2].contiguous().view(torch.float16).to(torch.float32)  # [..., nb, 1]
    if name == "q8_0":
        vals = b[..., 2:].contiguous().view(torch.int8).to(torch.float32)  # [..., nb, 32]
    elif name == "q4_0":
        qs = b[..., 2:]
        vals = (torch.cat((qs & 0x0F, qs >> 4), dim=-1).to(torch.int16) - 8).to(torch.float32)  # [..., nb, 32]
    else:
        raise GraphirError(f"KV cache type {name} is not executable")
    return (vals * scale).reshape(*lead, -1).to(dtype)


def to_cache(new: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    """New rows in the cache's storage: quantised for a block type, else cast to its dtype."""
    return quantize(new, name) if is_quant(name) else new.to(like.dtype)


def floats(t: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows as attention reads them: dequantised for a block type, else cast."""
    return dequantize(t, name, dtype) if is_quant(name) and t.dtype == torch.uint8 else t.to(dtype)
