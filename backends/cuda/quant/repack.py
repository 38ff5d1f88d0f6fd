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
- Q4_K (256-element super-blocks of 8 sub-blocks): every 32-element sub-block is a unit as in
  Q4_0 (raw 0..15, no zero point); `sub` int16 [N, K/32] holds its 6-bit scale | 6-bit min << 8
  (the file packs these 16 bytes into 12: unpacked, a super-block reads 148 bytes, not 144),
  and `d` f16 [N, K/256, 2] the super-block's (d, dmin). w = (d * sc) * q - dmin * m.
- Q6_K (256-element super-blocks, 6-bit q, an int8 scale per 16): the low 4 bits of every
  32-element unit are Q4_0's nibble words in `qs`; the top 2 bits of a 64-element pair of
  units (a, b) are 4 words in `qh` [N, K/64 * 4], where bits 4j..4j+1 of word w are the top
  bits of a's element 4j + w and bits 4j+2..4j+3 those of b's. So (word << 4) puts a's at bits
  4j+4..4j+5, right above nibble j of a's word w, and (word << 2) does the same for b: the
  kernel ORs them into the mantissa next to the nibble with one LOP3, and a 6-bit field is
  read as in Q4_0 (fields 5..7 of both from the words shifted right by 12, 8 and 10).
  `sub` int32 [N, K/64] holds a pair's four int8 scales as bytes, XOR 0x80 (the value + 128,
  for the mantissa trick), `d` f16 [N, K/256]. Bytes: 128 + 64 + 16 + 2 per 256 weights, the
  file's 210 (6.5625 bits a weight). w = (d * sc) * (q - 32).

- Q5_0 / Q4_1 / Q5_K: Q4_0's nibble words in `qs`. Q5_0's and Q5_K's 5th bits are `qh` int32
  [N, K/32], one word per 32-element unit whose bit 4j + w is the top bit of element 4j + w:
  shifted left by 4 - w it sits right above nibble j of word w (fields 5..7: right by 8 + w), and
  ORs into the mantissa as Q6_K's do. Q5_0's word is the file's qh unchanged (22 bytes per 32);
  Q5_K's 32 bytes per 256 are regrouped by sub-block (it reads 180 bytes per 256, as Q4_K
  148). Q4_1's `d` is f16 [N, K/32, 2] (d, m) and Q5_K's `d` and `sub` are Q4_K's; their mins go
  through sum(x) as Q4_K's do. w = d * (q - 16), d * q + m, (d * sc) * q - dmin * m.

`unpack` inverts the repack to the file's bytes and `dequantize` mirrors formats.dequantize's
arithmetic on the repacked arrays; the tests prove both bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cuda.quant.formats import (KVALUES, QuantFormatError, blocks, iq4_xs_scales, nibbles, planes,
                                         q4_k_scales, q6_k_values)

# quant type -> (32-bit words of `qs` per 32 elements, bits per quant field in them)
WORDS: dict[str, tuple[int, int]] = {"Q4_0": (4, 4), "Q8_0": (8, 8), "Q4_K": (4, 4), "Q6_K": (4, 4), "Q4_1": (4, 4),
                                     "Q5_0": (4, 4), "Q5_K": (4, 4), "IQ4_XS": (4, 4)}


@dataclass(frozen=True)
class Packed:
    """One weight [N, K] in the repacked layout (see the module docstring)."""

    qtype: str
    qs: torch.Tensor  # int32 [N, K / 32 * words per 32]
    d: torch.Tensor  # f16 [N, K / 32]; Q4_K: [N, K / 256, 2] (d, dmin); Q6_K: [N, K / 256]
    sub: torch.Tensor | None = None  # Q4_K: int16 [N, K / 32], sub-block scale | min << 8; Q6_K: int32 [N, K / 64]
    qh: torch.Tensor | None = None  # Q6_K: int32 [N, K / 64 * 4], the top 2 bits

    @property
    def arrays(self) -> tuple[torch.Tensor, ...]:
        """The arrays that hold the weight, each [N, columns proportional to K, ...]."""
        return tuple(t for t in (self.qs, self.d, self.sub, self.qh) if t is not None)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] // WORDS[self.qtype][0] * 32

    @property
    def nbytes(self) -> int:
        """The bytes the GEMV reads (the file's; Q4_K's sub-block scales take 16 bytes, not 12)."""
        return sum(t.numel() * t.element_size() for t in self.arrays)


def _words(qtype: str) -> tuple[int, int]:
    if qtype not in WORDS:
        raise QuantFormatError(f"no repacked layout for {qtype} (have {', '.join(WORDS)})")
    return WORDS[qtype]


def _to_words(byte: torch.Tensor) -> torch.Tensor:
    """uint8 [N, ..., 4 bytes, 4 words] -> int32 [N, -1] (little-endian words)."""
    return byte.transpose(-1, -2).contiguous().view(torch.int32).reshape(byte.shape[0], -1)


def _from_words(qs: torch.Tensor) -> torch.Tensor:
    """int32 [N, 4 U] -> uint8 [N, U, 4 bytes, 4 words] (the inverse of _to_words)."""
    return qs.contiguous().view(torch.uint8).reshape(qs.shape[0], -1, 4, 4).transpose(-1, -2)


def _nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """[N, U, 32] raw 4-bit values of units -> [N, U, 4 bytes, 4 words]: nibble j of word w is
    element 4j + w (byte t of a word holds fields 2t and 2t + 1)."""
    q = q.reshape(*q.shape[:2], 8, 4)  # [N, U, j, w]
    return q[:, :, 0::2] | (q[:, :, 1::2] << 4)


def _unplanes(q: torch.Tensor, width: int, bits: int) -> torch.Tensor:
    """formats.planes inverted: [..., n * 8 / bits] fields -> [..., n] bytes."""
    q = q.reshape(*q.shape[:-1], -1, 8 // bits, width)
    out = q[..., 0, :]
    for s in range(1, 8 // bits):
        out = out | (q[..., s, :] << (bits * s))
    return out.reshape(*q.shape[:-3], -1)


def _q6_k(b: torch.Tensor) -> Packed:
    n, nb = b.shape[0], b.shape[1]
    q = q6_k_values(b).reshape(n, nb * 4, 2, 32)  # [N, pair, unit a / b, 32]
    qs = _to_words(_nibble_bytes((q & 0x0F).reshape(n, nb * 8, 32)))
    top = q >> 4
    qh = _to_words(_nibble_bytes(top[:, :, 0] | (top[:, :, 1] << 2)))  # field j of word w: a's | b's << 2
    sub = (b[..., 192:208] ^ 0x80).contiguous().view(torch.int32).reshape(n, nb * 4)
    return Packed("Q6_K", qs, b[..., 208:210].contiguous().view(torch.float16).reshape(n, nb), sub, qh)


def _top_bits(p: Packed) -> torch.Tensor:
    """The bits of p.qh as uint8 [N, K] in the row's order (Q6_K: 2 per weight, Q5_*: 1)."""
    n = p.qs.shape[0]
    if p.qtype == "Q6_K":
        top = _fields(Packed("Q4_0", p.qh, p.d)).reshape(n, -1, 1, 32)  # [N, pair, 1, 32]: a's | b's << 2
        return torch.cat((top & 3, top >> 2), dim=2).reshape(n, -1)
    return planes(p.qh.contiguous().view(torch.uint8), 1, 1).reshape(n, -1)  # bit e of a unit's word: element e


def _values(p: Packed) -> torch.Tensor:
    """The raw quant values of p as uint8 [N, blocks, elements per block] in the row's order."""
    q = _fields(p).reshape(p.qs.shape[0], -1)
    if p.qh is not None:
        q = q | (_top_bits(p) << 4)
    return q.reshape(p.qs.shape[0], p.d.shape[1], -1)


def _q6_k_scales(p: Packed) -> torch.Tensor:
    """Packed Q6_K -> int8 [N, K / 16], the file's scales."""
    return (p.sub.contiguous().view(torch.uint8) ^ 0x80).view(torch.int8).reshape(p.qs.shape[0], -1)


def _half(b: torch.Tensor, n: int, nb: int, count: int) -> torch.Tensor:
    """count f16 fields at the front of b [N, B, 2 count] -> f16 [N, B] (count 1) or [N, B, count]."""
    d = b.contiguous().view(torch.float16)
    return d.reshape(n, nb) if count == 1 else d.reshape(n, nb, count)


def _words_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [N, ..., 32 m] single bits in row order -> int32 [N, m]: bit e of word u is element 32u + e."""
    return _unplanes(bits, 1, 1).contiguous().view(torch.int32).reshape(bits.shape[0], -1)


def repack(raw: torch.Tensor, qtype: str) -> Packed:
    """The file's bytes uint8 [N, nbytes] -> Packed (on raw's device)."""
    _words(qtype)
    b = blocks(raw, qtype)  # [N, B, bytes per block]
    n, nb = b.shape[0], b.shape[1]
    nib = lambda q: _to_words(_nibble_bytes(q.reshape(n, -1, 32)))  # noqa: E731 (4-bit values in row order)
    if qtype == "Q6_K":
        return _q6_k(b)
    if qtype in ("Q4_K", "Q5_K"):
        sc, mn = q4_k_scales(b[..., 4:16])  # [N, B, 8] each
        sub = (sc.to(torch.int16) | (mn.to(torch.int16) << 8)).reshape(n, nb * 8)
        qh = _words_of_bits(planes(b[..., 16:48], 32, 1)) if qtype == "Q5_K" else None
        return Packed(qtype, nib(planes(b[..., -128:], 32, 4)), _half(b[..., 0:4], n, nb, 2), sub, qh)
    if qtype == "Q4_1":
        return Packed(qtype, nib(nibbles(b[..., 4:])), _half(b[..., 0:4], n, nb, 2))
    if qtype == "IQ4_XS":  # code book indices as Q4_0's words; ls (6 bits, 0..63) per 32 in `sub`
        ls = (iq4_xs_scales(b) + 32).reshape(n, nb * 8)
        return Packed(qtype, nib(nibbles(b[..., 8:])), _half(b[..., 0:2], n, nb, 1), ls)
    d = _half(b[..., 0:2], n, nb, 1)  # [N, B]
    if qtype == "Q5_0":  # the file's qh is already a word per block whose bit e is element e's
        return Packed(qtype, nib(nibbles(b[..., 6:])), d, None, b[..., 2:6].contiguous().view(torch.int32).reshape(n, nb))
    if qtype == "Q4_0":
        return Packed(qtype, nib(nibbles(b[..., 2:])), d)
    byte = (b[..., 2:] ^ 0x80).reshape(n, nb * 2, 4, 4)  # [N, unit 2B + c, byte j, v]: q + 128 of 16c + 4j + v
    return Packed(qtype, _to_words(byte), d)


def _fields(p: Packed) -> torch.Tensor:
    """The quants of `qs` as uint8 [N, U, 32] in the row's element order (raw values), where a
    unit U is 32 elements for the 4-bit types and 16 for Q8_0."""
    byte = _from_words(p.qs)  # [N, U, 4 bytes, 4 words]
    if WORDS[p.qtype][1] == 8:  # byte j of word v -> element 4j + v of the 16
        return (byte ^ 0x80).reshape(p.qs.shape[0], -1, 16)
    q = torch.stack((byte & 0x0F, byte >> 4), dim=3)  # [N, U, 4, 2, w]: field 2t + h
    return q.reshape(p.qs.shape[0], -1, 32)  # element 4j + w


def _q4_k_scale_bytes(sub: torch.Tensor) -> torch.Tensor:
    """int16 [N, B, 8] scale | min << 8 -> the file's 12 bytes [N, B, 12] (q4_k_scales inverted)."""
    sc, mn = (sub & 0xFF).to(torch.uint8), (sub >> 8).to(torch.uint8)
    lo = torch.cat((sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6)), dim=-1)
    return torch.cat((lo, (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)), dim=-1)


def unpack(p: Packed) -> torch.Tensor:
    """Packed -> the file's bytes uint8 [N, nbytes] (the exact inverse of repack)."""
    n, nb = p.qs.shape[0], p.d.shape[1]
    q = _values(p)  # [N, B, elements per block]
    dbytes = p.d.contiguous().view(torch.uint8).reshape(n, nb, -1)
    if p.qtype == "Q6_K":
        sc = _q6_k_scales(p).view(torch.uint8).reshape(n, nb, 16)
        parts: tuple[torch.Tensor, ...] = (_unplanes(q & 0x0F, 64, 4), _unplanes(q >> 4, 32, 2), sc, dbytes)
    elif p.qtype in ("Q4_K", "Q5_K"):
        top = (_unplanes(q >> 4, 32, 1),) if p.qtype == "Q5_K" else ()
        parts = (dbytes, _q4_k_scale_bytes(p.sub.reshape(n, nb, 8)), *top, _unplanes(q & 0x0F, 32, 4))
    elif p.qtype == "Q8_0":
        parts = (dbytes, q)
    elif p.qtype == "IQ4_XS":
        parts = (dbytes, *_iq4_xs_scale_bytes(p.sub.reshape(n, nb, 8)), _pairs32(q))
    else:  # ggml's pairing of 32: byte i = q[i] | q[i+16] << 4, after Q5_0's qh
        top = (p.qh.contiguous().view(torch.uint8).reshape(n, nb, 4),) if p.qtype == "Q5_0" else ()
        parts = (dbytes, *top, _pairs32(q))
    return torch.cat(parts, dim=-1).reshape(n, -1)


def _pairs32(q: torch.Tensor) -> torch.Tensor:
    """[N, B, 32 m] 4-bit values -> [N, B, 16 m] bytes, ggml's pairing per 32: byte i = q[i] | q[i+16] << 4."""
    q = q.reshape(*q.shape[:2], -1, 32)
    return ((q[..., :16] & 0x0F) | (q[..., 16:] << 4)).reshape(*q.shape[:2], -1)


def _iq4_xs_scale_bytes(ls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 [N, B, 8] 6-bit scales -> the file's scales_h (2 bytes: 2 high bits each) and
    scales_l (4 bytes: the low nibbles, two a byte, the first low)."""
    ls = ls.to(torch.int32)
    hi = sum(((ls[..., i] >> 4) & 3) << (2 * i) for i in range(8))  # a u16
    lo = (ls & 0x0F).reshape(*ls.shape[:2], 4, 2)
    return (torch.stack((hi & 0xFF, hi >> 8), dim=-1).to(torch.uint8),  # type: ignore[union-attr]
            (lo[..., 0] | (lo[..., 1] << 4)).to(torch.uint8))


def dequantize(p: Packed) -> torch.Tensor:
    """Packed -> f32 [N, K] with formats.dequantize's arithmetic (bit-equal to it)."""
    n = p.qs.shape[0]
    q = _values(p)  # [N, B, elements per block]
    if p.qtype == "Q6_K":
        dl = (p.d.float()[..., None] * _q6_k_scales(p).reshape(n, -1, 16).float())[..., None]  # [N, B, 16, 1]
        return (dl * (q.to(torch.int8) - 32).float().reshape(n, -1, 16, 16)).reshape(n, -1)
    if p.qtype in ("Q4_K", "Q5_K"):
        dd, dmin = p.d.float().unbind(-1)  # [N, B]
        sub = p.sub.reshape(n, -1, 8)
        dl = (dd[..., None] * (sub & 0xFF).float())[..., None]  # [N, B, 8, 1]
        ml = (dmin[..., None] * (sub >> 8).float())[..., None]
        return (dl * q.reshape(n, -1, 8, 32).float() - ml).reshape(n, -1)
    if p.qtype == "IQ4_XS":
        dl = (p.d.float()[..., None] * (p.sub.reshape(n, -1, 8) - 32).float())[..., None]  # [N, B, 8, 1]
        kv = torch.tensor(KVALUES, dtype=torch.float32, device=q.device)
        return (dl * kv[q.long()].reshape(n, -1, 8, 32)).reshape(n, -1)
    if p.qtype == "Q4_1":
        d, m = p.d.float().unbind(-1)
        return (d[..., None] * q.float() + m[..., None]).reshape(n, -1)
    d = p.d.float()[..., None]  # [N, B, 1]
    if p.qtype in ("Q4_0", "Q5_0"):
        return (d * (q.to(torch.int8) - (8 if p.qtype == "Q4_0" else 16)).float()).reshape(n, -1)
    return (q.view(torch.int8).float() * d).reshape(n, -1)
