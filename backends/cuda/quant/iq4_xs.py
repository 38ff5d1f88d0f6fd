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
Compiled for sm_90 (Triton 3.9, bf16 x, tile 8 rows x 128 units, 4 warps) the loop is 6.9 SASS
instructions a weight (per 256 weights a thread: 200 PRMT, 400 LOP3, 368 FADD, 200 FFMA, 179 SHF,
the rest address and reduction work), no spills; at an H200's ~3.3e13 thread instructions a second
that is ~4.8e12 weights a second, ~55 % of the bound its 4.56 bits a weight set (Q4_0: 3.9). Not
yet timed on a GPU.

Layout (repack.py): the quants as Q4_0's repacked words (per 32 weights, 4 int32 words; nibble j of
word w is element 4j + w, the raw index), so the PRMT of word w's low nibbles yields bytes
j = 0..3 holding elements 4j + w (a Q8_0 unit of 16), its high nibbles the next 16; `d` f16
[N, K/256] as in the file; `sub` int16 [N, K/32] the 6-bit ls (the file packs 8 of them in
6 bytes): 146 bytes per 256 weights are read, 4.56 bits a weight (the file: 4.25).

This module holds the code book and the device code of the lookup (`_book`); the GEMV is
gemv.py's kernel (KIND "IQ4_XS"), the layout repack.py's. PRMT is PTX (inline assembly):
Triton's CPU interpreter cannot run it, so under the interpreter the kernel builds the same
bytes with shifts and selects (`_prmt`, ASM=False), and the tests there check everything but
the instruction itself; on a GPU the tests run the PTX.
"""

from __future__ import annotations

import os

from backends.cuda.quant.formats import KVALUES
from backends.cuda.triton_kernels.fused import tl, triton

BOOK = tuple(v + 128 for v in KVALUES)  # the code book as unsigned bytes, 16 of them


def _word(i: int) -> int:
    v = sum(BOOK[4 * i + b] << (8 * b) for b in range(4))
    return v - (1 << 32) if v >= 1 << 31 else v  # as an int32


# its four little-endian words: T0, T1 hold entries 0..7 (q < 8), T2, T3 entries 8..15
T0, T1, T2, T3 = (_word(i) for i in range(4))


def use_asm() -> bool:
    """PRMT itself, except under Triton's interpreter (which runs no PTX)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


if triton is not None:

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
