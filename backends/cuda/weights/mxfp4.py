"""MXFP4 (OCP microscaling FP4) as gpt-oss's transformers checkpoints store the experts.

A tensor `x_blocks` uint8 [..., rows, G, 16] holds 32 E2M1 values per group of one row (two a
byte, the low nibble first), `x_scales` uint8 [..., rows, G] one E8M0 exponent per group
(bias 127): value = fp4 * 2^(scale - 127). The rows are the projection's outputs, the groups
run along its input, so the result is [..., rows, 32 G] = [E, out, in], graphir's layout.
Dequantised at load time (the executor computes in a float type); GGUF files store the same
format as ggml's `mxfp4` blocks (graphir.dtypes), whose nibble order differs.
"""

from __future__ import annotations

import torch

# E2M1 code -> value (sign bit 3)
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> f32 [..., 32 G]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != 16 \
            or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} {blocks.dtype} and scales {list(scales.shape)} "
                         f"{scales.dtype} are not uint8 [..., G, 16] and [..., G]")
    lut = torch.tensor(FP4, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]: low nibble first
    vals = lut[codes].reshape(*blocks.shape[:-1], 32)  # [..., G, 32]
    out = torch.ldexp(vals, scales.to(torch.int32)[..., None] - 127)
    return out.reshape(*blocks.shape[:-2], -1)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f32 [..., 32 G] -> (blocks, scales) with each group's largest magnitude mapped onto
    6 * 2^e or below (nearest code per value): what a checkpoint writer stores. Tests only."""
    g = x.to(torch.float32).reshape(*x.shape[:-1], -1, 32)  # [..., G, 32]
    amax = g.abs().amax(dim=-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    lut = torch.tensor(FP4, dtype=torch.float32)
    scaled = g / torch.ldexp(torch.ones_like(e), e.to(torch.int32))[..., None]
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)  # [..., G, 32]
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), (e + 127).to(torch.uint8)
