"""GGUF block formats as bytes, and their dequantisation in torch (the reference of this package).

A quantised tensor of a GGUF file is, per row, a run of fixed-size blocks; each block holds
`BLOCK` consecutive weights of the row. Here a tensor is what the file stores: a uint8 tensor
[rows, blocks * block bytes] (any device). `dequantize` turns it into f32 [rows, K] with the
same arithmetic, in the same order, as `gguf.quants.dequantize` (numpy, f32), so the two agree
bit for bit (the tests prove it); everything faster in this package is checked against it.

Block layouts (little endian, from ggml-common.h):
- Q8_0   (34 B / 32):  d f16 | 32 x int8 q.                      w = d * q
- Q4_0   (18 B / 32):  d f16 | 16 B: byte i = q[i] | q[i+16] << 4. w = d * (q - 8)
- Q4_K  (144 B / 256): d f16 | dmin f16 | 12 B of 6-bit scales and mins for 8 sub-blocks of 32 |
                       128 B: 4 chunks of 32 B; chunk c holds sub-block 2c (low nibbles) and 2c+1.
                       w = (d * sc) * q - dmin * m
- Q4_1   (20 B / 32):  d f16 | m f16 | 16 B as Q4_0.              w = d * q + m
- Q5_0   (22 B / 32):  d f16 | qh u32 (bit i: element i's 5th bit) | 16 B as Q4_0.  w = d * (q - 16)
- Q5_1   (24 B / 32):  d f16 | m f16 | qh u32 | 16 B as Q4_0.      w = d * q + m
- Q2_K   (84 B / 256): 16 B scales (low nibble: scale, high: min, per 16 weights) | 64 B of 2-bit
                       q (2 chunks of 32 B; bits 2s..2s+1 of byte i of chunk c: element 128c + 32s + i)
                       | d f16 | dmin f16.                     w = (d * sc) * q - dmin * m
- Q3_K  (110 B / 256): hmask 32 B (bit s of byte i: element 32s + i's high bit, set = no offset) |
                       64 B of low 2 bits as Q2_K | 12 B of 6-bit scales | d f16.
                       w = (d * (sc - 32)) * (q - 4 * (1 - h))
- Q5_K  (176 B / 256): Q4_K's d, dmin and scales | qh 32 B (bit s of byte i: element 32s + i) |
                       128 B as Q4_K.                          w = (d * sc) * q - dmin * m
- Q6_K  (210 B / 256): ql 128 B (2 halves of 64 B; the low nibbles of half h are elements
                       128h + 0..63, the high 128h + 64..127) | qh 64 B (2 halves of 32 B; bits
                       2s..2s+1 of byte i: element 128h + 32s + i's top 2 bits) | int8 scales[16]
                       (one per 16 weights) | d f16.           w = (d * sc) * (q - 32)
- IQ4_NL (18 B / 32):  d f16 | 16 B of indices into KVALUES as Q4_0.  w = d * KVALUES[q]
- IQ4_XS (136 B / 256): d f16 | scales_h u16 (2 high bits per sub-block) | 4 B of low nibbles of
                       the 6-bit sub-block scales | 128 B: 8 sub-blocks of 16 B as in Q4_0.
                       w = (d * (scale - 32)) * KVALUES[q]
"""

from __future__ import annotations

from typing import Callable

import torch

# (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES has them
SIZES: dict[str, tuple[int, int]] = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
                                     "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
                                     "Q5_K": (256, 176), "Q6_K": (256, 210), "IQ4_NL": (32, 18),
                                     "IQ4_XS": (256, 136)}
# IQ4_NL's non-linear 4-bit code book, shared by IQ4_XS (ggml-common.h kvalues_iq4nl)
KVALUES: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class QuantFormatError(ValueError):
    """Bytes that are not whole blocks of the named type, or a type this package lacks."""


def block_shape(qtype: str) -> tuple[int, int]:
    if qtype not in SIZES:
        raise QuantFormatError(f"quant type {qtype!r} is not one of {', '.join(SIZES)}")
    return SIZES[qtype]


def blocks(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """raw uint8 [rows, nbytes] -> [rows, n_blocks, block bytes] (a view; checks the sizes)."""
    _, size = block_shape(qtype)
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise QuantFormatError(f"{qtype} bytes must be a 2-d uint8 tensor, got {raw.dtype} {tuple(raw.shape)}")
    if raw.shape[1] % size:
        raise QuantFormatError(f"{qtype} row of {raw.shape[1]} bytes is not whole {size}-byte blocks")
    return raw.reshape(raw.shape[0], raw.shape[1] // size, size)


def row_elements(raw: torch.Tensor, qtype: str) -> int:
    """K: weights per row of the raw tensor."""
    bs, size = block_shape(qtype)
    return raw.shape[1] // size * bs


def half(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 (little-endian f16 bytes) -> [...] f32, exactly as numpy's view + astype."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16 * m] packed bytes -> [..., 32 * m] as ggml orders them: per 16-byte run, the low
    nibbles are elements 0..15 and the high nibbles 16..31 of that run's 32."""
    q = qs.reshape(*qs.shape[:-1], -1, 1, 16)
    q = torch.cat((q & 0x0F, q >> 4), dim=-2)  # [..., m, 2, 16]
    return q.reshape(*qs.shape[:-1], -1)


def planes(x: torch.Tensor, width: int, bits: int) -> torch.Tensor:
    """[..., n] bytes -> [..., n * 8 / bits] fields as ggml orders them: per run of `width`
    bytes, the fields at bits 0..bits-1 of every byte, then those at bits..2 bits-1, and so on
    (gguf's `reshape(-1, 1, width) >> shifts & mask`)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device).reshape(-1, 1)
    q = (x.reshape(*x.shape[:-1], -1, 1, width) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*x.shape[:-1], -1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 34] -> [R, B, 32]
    return b[..., 2:].contiguous().view(torch.int8).float() * half(b[..., 0:2])[..., None]


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 18] -> [R, B, 32]
    q = (nibbles(b[..., 2:]).to(torch.int8) - 8).float()
    return half(b[..., 0:2])[..., None] * q


def q4_k_scales(sc12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 12] packed 6-bit (scale, min) of 8 sub-blocks -> two [..., 8] uint8 tensors.
    Bytes 0-3: scales 0-3 (low 6 bits) + scales 4-7's top 2; 4-7: mins likewise; 8-11: the low
    4 bits of scales 4-7 and (high nibble) of mins 4-7 (ggml's get_scale_min_k4)."""
    d, m, md = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 144] -> [R, B, 256]
    d, dmin = half(b[..., 0:2]), half(b[..., 2:4])
    sc, mn = q4_k_scales(b[..., 4:16])
    dl = (d[..., None] * sc.float())[..., None]  # [R, B, 8, 1]
    ml = (dmin[..., None] * mn.float())[..., None]
    qs = b[..., 16:].reshape(*b.shape[:-1], 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-2).reshape(*b.shape[:-1], 8, 32).float()  # chunk c -> sub-blocks 2c, 2c+1
    return (dl * q - ml).reshape(*b.shape[:-1], 256)


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 20] -> [R, B, 32]
    return half(b[..., 0:2])[..., None] * nibbles(b[..., 4:]).float() + half(b[..., 2:4])[..., None]


def q5_values(b: torch.Tensor, qh: int) -> torch.Tensor:
    """Q5_0 / Q5_1 blocks -> [..., 32] uint8 5-bit values (qh: the u32's byte offset)."""
    return nibbles(b[..., qh + 4:]) | (planes(b[..., qh:qh + 4], 1, 1) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 22] -> [R, B, 32]
    return half(b[..., 0:2])[..., None] * (q5_values(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 24] -> [R, B, 32]
    return half(b[..., 0:2])[..., None] * q5_values(b, 4).float() + half(b[..., 2:4])[..., None]


def _q2_k(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 84] -> [R, B, 256]
    sc = b[..., :16]
    dl = (half(b[..., 80:82])[..., None] * (sc & 0xF).float())[..., None]  # [R, B, 16, 1]
    ml = (half(b[..., 82:84])[..., None] * (sc >> 4).float())[..., None]
    q = planes(b[..., 16:80], 32, 2).reshape(*b.shape[:-1], 16, 16).float()
    return (dl * q - ml).reshape(*b.shape[:-1], 256)


def q3_k_scales(sc12: torch.Tensor) -> torch.Tensor:
    """[..., 12] packed 6-bit scales of Q3_K's 16 sub-blocks -> [..., 16] int8 scales minus 32:
    bytes 0-7 hold the low nibbles (scales 0-7, then 8-15 in the high nibbles), bytes 8-11 the
    top 2 bits (bits 2s..2s+1 of byte 8 + i: scale 4s + i)."""
    low = planes(sc12[..., :8], 8, 4)
    high = planes(sc12[..., 8:], 4, 2)
    return (low | (high << 4)).to(torch.int8) - 32


def _q3_k(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 110] -> [R, B, 256]
    dl = (half(b[..., 108:110])[..., None] * q3_k_scales(b[..., 96:108]).float())[..., None]  # [R, B, 16, 1]
    ql = planes(b[..., 32:96], 32, 2).to(torch.int8)
    off = ((planes(b[..., :32], 32, 1) ^ 1) << 2).to(torch.int8)  # the offset is 4 where the mask bit is 0
    q = (ql - off).float().reshape(*b.shape[:-1], 16, 16)
    return (dl * q).reshape(*b.shape[:-1], 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 176] -> [R, B, 256]
    d, dmin = half(b[..., 0:2]), half(b[..., 2:4])
    sc, mn = q4_k_scales(b[..., 4:16])
    dl = (d[..., None] * sc.float())[..., None]  # [R, B, 8, 1]
    ml = (dmin[..., None] * mn.float())[..., None]
    q = planes(b[..., 48:], 32, 4) | (planes(b[..., 16:48], 32, 1) << 4)
    return (dl * q.reshape(*b.shape[:-1], 8, 32).float() - ml).reshape(*b.shape[:-1], 256)


def q6_k_values(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [..., 210] -> [..., 256] uint8 raw 6-bit values (0..63, the weight's q + 32)."""
    return planes(b[..., :128], 64, 4) | (planes(b[..., 128:192], 32, 2) << 4)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 210] -> [R, B, 256]
    dl = (half(b[..., 208:210])[..., None] * b[..., 192:208].view(torch.int8).float())[..., None]  # [R, B, 16, 1]
    q = (q6_k_values(b).to(torch.int8) - 32).float().reshape(*b.shape[:-1], 16, 16)
    return (dl * q).reshape(*b.shape[:-1], 256)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 18] -> [R, B, 32]
    kv = torch.tensor(KVALUES, dtype=torch.float32, device=b.device)
    return half(b[..., 0:2])[..., None] * kv[nibbles(b[..., 2:]).long()]


def iq4_xs_scales(b: torch.Tensor) -> torch.Tensor:
    """[..., 136] IQ4_XS blocks -> [..., 8] int 6-bit sub-block scales minus 32 (int16)."""
    hi = b[..., 2].to(torch.int32) | (b[..., 3].to(torch.int32) << 8)  # scales_h as a u16
    shifts = torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)
    h = (hi[..., None] >> shifts) & 3  # [..., 8]
    lo = b[..., 4:8]
    low = torch.stack((lo & 0x0F, lo >> 4), dim=-1).reshape(*b.shape[:-1], 8).to(torch.int32)
    return (low | (h << 4)).to(torch.int16) - 32


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:  # b [R, B, 136] -> [R, B, 256]
    dl = (half(b[..., 0:2])[..., None] * iq4_xs_scales(b).float())[..., None]  # [R, B, 8, 1]
    kv = torch.tensor(KVALUES, dtype=torch.float32, device=b.device)
    q = kv[nibbles(b[..., 8:]).long()].reshape(*b.shape[:-1], 8, 32)
    return (dl * q).reshape(*b.shape[:-1], 256)


_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k, "Q3_K": _q3_k,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """raw uint8 [rows, nbytes] (the file's bytes) -> f32 [rows, K], bit-equal to gguf's numpy."""
    b = blocks(raw, qtype)
    return _DEQUANT[qtype](b).reshape(raw.shape[0], -1)
