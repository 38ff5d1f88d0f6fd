"""Load-time repack of GGUF blocks into the structure-of-arrays layout the GEMV kernels read.

A GGUF block interleaves its f16 scale with its quants (18 or 34 bytes: not a multiple of 4),
so a kernel reading the file's bytes cannot issue aligned 16-byte loads and must pick bytes one
by one. The repack splits every row into two arrays holding exactly the same bits:

- `qs`: int32 words [N, blocks * words per block], a block's quants in whole words;
- `d`:  the block scales, f16 [N, blocks] (the file's f16 bits, unchanged).

Inside a block the quants are permuted so that, for the kernel, "the j-th field of every word
of a block" is a *contiguous* run of the row (so x for that field loads as one vector) and a
field is isolated with one AND against a constant (no shift per weight, see gemv.py):

- Q4_0 (4 words / block): nibble j (bits 4j..4j+3) of word w holds element 4j + w, as the raw
  value 0..15 (w = d * (q - 8)).
- Q8_0 (8 words / block, two units of 4 words and 16 elements): byte j (bits 8j..8j+7) of word
  w = 4c + v holds element 16c + 4j + v, stored as q + 128 (0..255, a bijection of int8) so
  that it can be OR-ed into a float's mantissa. Both types thus read as units of 4 words (one
  16-byte load) whose field j is elements 4j..4j+3 of the unit: one kernel serves both.

`unpack` inverts the repack to the file's bytes and `dequantize` mirrors formats.dequantize's
arithmetic on the repacked arrays; the tests prove both bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cuda.quant.formats import QuantFormatError, nibbles, blocks

# quant type -> (32-bit words per 32-element block, bits per quant field)
WORDS: dict[str, tuple[int, int]] = {"Q4_0": (4, 4), "Q8_0": (8, 8)}


@dataclass(frozen=True)
class Packed:
    """One weight [N, K] in the repacked layout (see the module docstring)."""

    qtype: str
    qs: torch.Tensor  # int32 [N, K / 32 * words per block]
    d: torch.Tensor  # f16 [N, K / 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.d.shape[1] * 32

    @property
    def nbytes(self) -> int:
        """The quant's real bytes (the same as the file's: nothing is added)."""
        return self.qs.numel() * 4 + self.d.numel() * 2


def _words(raw: torch.Tensor, qtype: str) -> tuple[int, int]:
    if qtype not in WORDS:
        raise QuantFormatError(f"no repacked layout for {qtype} (have {', '.join(WORDS)})")
    return WORDS[qtype]


def repack(raw: torch.Tensor, qtype: str) -> Packed:
    """The file's bytes uint8 [N, nbytes] -> Packed (on raw's device)."""
    nw, _ = _words(raw, qtype)
    b = blocks(raw, qtype)  # [N, B, bytes per block]
    n, nb = b.shape[0], b.shape[1]
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(n, nb)  # [N, B]
    if qtype == "Q4_0":
        q = nibbles(b[..., 2:]).reshape(n, nb, 8, 4)  # [N, B, j, w]: element 4j + w, 0..15
        byte = q[:, :, 0::2] | (q[:, :, 1::2] << 4)  # [N, B, 4 bytes, w]: byte t = fields 2t, 2t+1
    else:
        byte = (b[..., 2:] ^ 0x80).reshape(n, nb, 2, 4, 4)  # [N, B, c, byte j, v]: q + 128 of 16c + 4j + v
    qs = byte.transpose(-1, -2).contiguous().view(torch.int32).reshape(n, nb * nw)  # little-endian words
    return Packed(qtype, qs, d)


def _fields(p: Packed) -> torch.Tensor:
    """The quants of p as uint8 [N, B, 32] in the row's element order (raw values)."""
    nw, bits = WORDS[p.qtype]
    n, nb = p.d.shape
    byte = p.qs.reshape(n, nb, nw).contiguous().view(torch.uint8).reshape(n, nb, nw // 4, 4, 4).transpose(-1, -2)
    if bits == 8:  # [N, B, c, byte j, v] -> element 16c + 4j + v
        return (byte ^ 0x80).reshape(n, nb, 32)
    byte = byte[:, :, 0]  # Q4_0: one unit per block
    q = torch.stack((byte & 0x0F, byte >> 4), dim=3)  # [N, B, 4, 2, w]: field 2t + h
    return q.reshape(n, nb, 32)  # element 4j + w


def unpack(p: Packed) -> torch.Tensor:
    """Packed -> the file's bytes uint8 [N, nbytes] (the exact inverse of repack)."""
    n, nb = p.d.shape
    q = _fields(p)  # [N, B, 32]
    if p.qtype == "Q4_0":
        q = q[..., :16] | (q[..., 16:] << 4)  # ggml's pairing: byte i = q[i] | q[i+16] << 4
    d = p.d.contiguous().view(torch.uint8).reshape(n, nb, 2)
    return torch.cat((d, q), dim=-1).reshape(n, -1)


def dequantize(p: Packed) -> torch.Tensor:
    """Packed -> f32 [N, K] with formats.dequantize's arithmetic (bit-equal to it)."""
    q = _fields(p)
    d = p.d.float()[..., None]  # [N, B, 1]
    if p.qtype == "Q4_0":
        return (d * (q.to(torch.int8) - 8).float()).reshape(p.qs.shape[0], -1)
    return (q.view(torch.int8).float() * d).reshape(p.qs.shape[0], -1)

