"""IQ4_XS weights kept in their blocks, and a decode GEMV that reads the code book by byte permutes.

IQ4_XS (136 bytes per 256 weights, 4.25 bits a weight) stores a 4-bit index q per weight into a
non-linear code book of 16 int8 values (formats.KVALUES) and a 6-bit scale ls per 32 weights
under an f16 d per 256: w = d * (ls - 32) * KVALUES[q]. The value is not linear in q, so the
mantissa trick of gemv.py (one AND-OR makes a float of a field) cannot read q directly; a
lookup per weight (selects, shared memory) would spend the ~4 instructions a weight that an
H200's bandwidth leaves (gemv.py's docstring) several times over.

The lookup here is the byte permute PRMT: it picks 4 bytes out of an 8-byte pool by four 3-bit
selectors, so two PRMTs give KVALUES[q & 7] and KVALUES[8 + (q & 7)] for 4 weights at once,
and a third picks, byte by byte, one of the two by q's top bit. The code book is stored
+128 (unsigned 1..241), so the 4 looked-up bytes of a word are exactly a Q8_0 word of the
repacked layout and the rest is gemv.py's Q8_0 arithmetic. Per 8 weights: 6 PRMTs and ~9 shifts
and masks, then per weight one AND-OR, one FADD, one FFMA: ~4.9 instructions a weight by count.
Compiled for sm_90 (Triton 3.9, bf16 x, tile 8 rows x 128 units, 4 warps) the loop is 6.8 SASS
instructions a weight (per 256 weights a thread: 200 PRMT, 400 LOP3, 368 FADD, 200 FFMA, 176 SHF,
the rest address and reduction work), no spills; at an H200's ~3.3e13 thread instructions a second
that is ~4.9e12 weights a second, ~57 % of the 4.5-bit bandwidth bound (Q4_0's kernel: 3.9). Not
yet timed on a GPU.

Layout (repack): the quants as Q4_0's repacked words (per 32 weights, 4 int32 words; nibble j of
word w is element 4j + w, the raw index), so the PRMT of word w's low nibbles yields bytes
j = 0..3 holding elements 4j + w (a Q8_0 unit of 16), its high nibbles the next 16; `d` f16
[N, K/256] as in the file; `sub` int16 [N, K/32] the 6-bit ls (the file packs 8 of them in
6 bytes). 4.5 bits a weight are read (the file: 4.25). `unpack` gives the file's bytes back.

PRMT is PTX (inline assembly): Triton's CPU interpreter cannot run it, so under the interpreter
the kernel builds the same bytes with shifts and selects (`_prmt`, ASM=False), and the tests
there check everything but the instruction itself; on a GPU the tests run the PTX.
"""

from __future__ import annotations

import os

import torch

from backends.cuda.quant.formats import KVALUES, blocks, iq4_xs_scales, nibbles
from backends.cuda.quant.repack import Packed, _from_words, _nibble_bytes, _to_words
from backends.cuda.triton_kernels.fused import on, tl, triton, usable

QTYPE = "IQ4_XS"
_BOOK = tuple(v + 128 for v in KVALUES)  # the code book as unsigned bytes, 16 of them
# its four little-endian words: T0, T1 hold entries 0..7 (q < 8), T2, T3 entries 8..15


def _word(i: int) -> int:
    v = sum(_BOOK[4 * i + b] << (8 * b) for b in range(4))
    return v - (1 << 32) if v >= 1 << 31 else v  # as an int32


T0, T1, T2, T3 = (_word(i) for i in range(4))


def repack(raw: torch.Tensor) -> Packed:
    """The file's bytes uint8 [N, K/256 * 136] -> Packed (qs as Q4_0's words, d, sub = ls)."""
    b = blocks(raw, QTYPE)  # [N, B, 136]
    n, nb = b.shape[0], b.shape[1]
    ls = (iq4_xs_scales(b) + 32).reshape(n, nb * 8)  # 0..63
    q = nibbles(b[..., 8:]).reshape(n, nb * 8, 32)  # code book indices in row order
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(n, nb)
    return Packed(QTYPE, _to_words(_nibble_bytes(q)), d, ls)


def _indices(p: Packed) -> torch.Tensor:
    """The code book indices of p, uint8 [N, K/32, 32] in row order."""
    byte = _from_words(p.qs)  # [N, U, 4 bytes, 4 words]
    return torch.stack((byte & 0x0F, byte >> 4), dim=3).reshape(p.qs.shape[0], -1, 32)


def unpack(p: Packed) -> torch.Tensor:
    """Packed -> the file's bytes uint8 [N, K/256 * 136] (repack inverted)."""
    n, nb = p.d.shape
    ls = p.sub.reshape(n, nb, 8).to(torch.int32)  # type: ignore[union-attr]
    hi = sum(((ls[..., i] >> 4) & 3) << (2 * i) for i in range(8))  # scales_h, a u16
    lo = (ls & 0x0F).reshape(n, nb, 4, 2)
    lo = (lo[..., 0] | (lo[..., 1] << 4)).to(torch.uint8)  # scales_l: 2 per byte, low nibble first
    q = _indices(p).reshape(n, nb, 8, 32)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, nb, 128)  # ggml: byte i = q[i] | q[i+16] << 4
    head = torch.cat((p.d.contiguous().view(torch.uint8).reshape(n, nb, 2),
                      torch.stack((hi & 0xFF, hi >> 8), dim=-1).to(torch.uint8), lo), dim=-1)
    return torch.cat((head, qs), dim=-1).reshape(n, -1)


def dequantize(p: Packed) -> torch.Tensor:
    """f32 [N, K] with formats' arithmetic, in its order (bit-equal to gguf)."""
    n, nb = p.d.shape
    scale = p.sub.reshape(n, nb, 8) - 32  # type: ignore[union-attr]
    dl = (p.d.float()[..., None] * scale.float())[..., None]  # [N, B, 8, 1]
    kv = torch.tensor(KVALUES, dtype=torch.float32, device=p.qs.device)
    return (dl * kv[_indices(p).long()].reshape(n, nb, 8, 32)).reshape(n, -1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    from backends.cuda.quant.gemv import _int6, _term, _x

    @triton.jit
    def _prmt(a, b, sel, ASM: tl.constexpr):
        # byte k of the result = byte (sel >> 4k) & 7 of the 8-byte pool {b: bytes 4..7, a: bytes 0..3}
        # (PRMT's default mode for selectors below 8; the callers keep bit 3 of each clear)
        if ASM:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                             dtype=tl.int32, is_pure=True, pack=1)
        out = sel * 0
        for k in tl.static_range(4):
            i = (sel >> (4 * k)) & 7
            src = tl.where(i < 4, a, b)
            out = out | (((src >> ((i & 3) * 8)) & 0xFF) << (8 * k))
        return out

    @triton.jit
    def _book(w, t0, t1, t2, t3, ASM: tl.constexpr):
        # the code book's bytes (+128) for the low 4 nibbles of w, nibble k -> byte k
        lo = _prmt(t0, t1, w & 0x7777, ASM)
        hi = _prmt(t2, t3, w & 0x7777, ASM)
        return _prmt(lo, hi, ((w >> 1) & 0x4444) | 0x3210, ASM)  # byte k from hi where nibble k >= 8

    @triton.jit
    def _bytes16(v, xp, mb, magic, OFF: tl.constexpr, EVEN: tl.constexpr):
        # a Q8_0-layout unit (byte j of word w is element 4j + w, stored + 128) times x[OFF:OFF+16]
        h = v >> 12
        t = _term(v, _x(xp, mb, OFF, EVEN), magic, 0xFF, 8388736.0, 1.0)
        t += _term(v, _x(xp, mb, OFF + 4, EVEN), magic, 0xFF00, 8421376.0, 0.00390625)
        t += _term(h, _x(xp, mb, OFF + 8, EVEN), magic, 0xFF0, 8390656.0, 0.0625)
        t += _term(h, _x(xp, mb, OFF + 12, EVEN), magic, 0xFF000, 8912896.0, 0.000244140625)
        return t

    @triton.jit
    def _iq4_xs_k(x_ptr, q_ptr, d_ptr, s_ptr, o_ptr, N, NU, UPS, sq, sd, ss, so, magic, t0, t1, t2, t3,
                  BN: tl.constexpr, BB: tl.constexpr, PARTIAL: tl.constexpr, EVEN_N: tl.constexpr,
                  EVEN: tl.constexpr, ASM: tl.constexpr):
        # as gemv._gemv_k: program (i, s) takes rows [i*BN, +BN) and 32-weight units [s*UPS, +UPS)
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        mr = rows < N
        r64 = rows.to(tl.int64)
        wi = tl.arange(0, 4)
        b_lo = tl.program_id(1) * UPS
        b_hi = tl.minimum(NU, b_lo + UPS)
        acc = tl.zeros([BN, BB], dtype=tl.float32)
        for b0 in range(b_lo, b_hi, BB):
            blk = b0 + tl.arange(0, BB)
            mb = blk < b_hi
            m2 = mr[:, None] & mb[None, :]
            qp = q_ptr + r64[:, None, None] * sq + (blk * 4)[None, :, None] + wi[None, None, :]  # [BN, BB, 4]
            dp = d_ptr + r64[:, None] * sd + (blk // 8)[None, :]  # the super-block's d
            sp = s_ptr + r64[:, None] * ss + blk[None, :]
            if EVEN and EVEN_N:
                w = tl.load(qp)
                d = tl.load(dp).to(tl.float32)
                ls = tl.load(sp).to(tl.int32)
            else:
                w = tl.load(qp, mask=mr[:, None, None] & mb[None, :, None], other=0)
                d = tl.load(dp, mask=m2, other=0.0).to(tl.float32)
                ls = tl.load(sp, mask=m2, other=0).to(tl.int32)
            xp = x_ptr + (blk * 32)[:, None] + wi[None, :]  # [BB, 4]: element w of each unit
            t = _bytes16(_book(w, t0, t1, t2, t3, ASM), xp, mb, magic, 0, EVEN)  # elements 0..15
            t += _bytes16(_book(w >> 16, t0, t1, t2, t3, ASM), xp, mb, magic, 16, EVEN)  # 16..31
            acc += tl.sum(t, axis=2) * (d * (_int6(ls, magic) - 32.0))
        y = tl.sum(acc, axis=1)
        if not PARTIAL:
            y = y.to(o_ptr.dtype.element_ty)
        if EVEN_N:
            tl.store(o_ptr + tl.program_id(1) * so + rows, y)
        else:
            tl.store(o_ptr + tl.program_id(1) * so + rows, y, mask=mr)


Config = tuple[int, int, int, int]  # as gemv.Config: (BN rows, BB units a step, warps, split of K)
MAGIC = 0x4B000000  # the f32 bits of 2^23 (gemv.MAGIC)


def reference(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """Dequantise and multiply in f32, rounded to x's dtype."""
    return (x.float() @ dequantize(p).to(x.device).T).to(x.dtype)


def gemv(x: torch.Tensor, p: Packed, cfg: Config = (8, 128, 4, 1)) -> torch.Tensor:
    """x [1, K] bf16/f16/f32 @ W[N, K]^T -> [1, N] in x's dtype; the kernel where Triton runs
    (CUDA, or the interpreter), else the reference."""
    if not (usable(x) and p.qs.device == x.device):
        return reference(x, p)
    bn, bb, warps, split = cfg
    n, nu = p.qs.shape[0], p.qs.shape[1] // 4  # 32-weight units per row
    split = max(1, min(split, nu))
    ups = triton.cdiv(nu, split)
    bb = min(bb, triton.next_power_of_2(ups))
    part = split > 1
    even = nu % split == 0 and ups % bb == 0
    x = x.contiguous()
    out = torch.empty((split, n) if part else (1, n), dtype=torch.float32 if part else x.dtype, device=x.device)
    with on(x):
        _iq4_xs_k[(triton.cdiv(n, bn), split)](
            x, p.qs, p.d, p.sub, out, n, nu, ups, p.qs.stride(0), p.d.stride(0), p.sub.stride(0),  # type: ignore[union-attr]
            out.stride(0), MAGIC, T0, T1, T2, T3, BN=bn, BB=bb, PARTIAL=part, EVEN_N=n % bn == 0, EVEN=even,
            ASM=not interpreting(), num_warps=warps, enable_fp_fusion=True)
    return out.sum(0, keepdim=True).to(x.dtype) if part else out
