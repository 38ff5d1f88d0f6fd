"""Decode GEMV on repacked GGUF weights: y[1, N] = x[1, K] @ W^T, W read in its quant bytes.

At T = 1 a projection should take the time of reading its weight once; a 4.5-bit Q4_0 weight
is 3.6x fewer bytes than bf16. The catch is instructions: an H200 streams ~8.5e12 Q4_0 weights
a second but issues only ~3.3e13 thread instructions, about 4 per weight for everything.
What costs more than that is an int -> f32 conversion (I2F runs at 1/8 of the FMA rate: at one
per weight it alone caps the kernel near half the bandwidth) and a byte-by-byte load.
So the kernel here:

- loads whole words: a program's tile is [BN rows, BB units, 4 words] int32, one 16-byte
  vector load per unit (the repack made each block's quants whole, aligned words; a unit is a
  Q4_0 block, half a Q8_0 block or a Q4_K sub-block);
- turns a field into a float without a conversion: (word & mask) is q * 2^s; OR-ed into the
  mantissa of 2^23 (bits 0x4B000000) it reads as 2^23 + q * 2^s exactly, and one subtraction
  of 2^23 + zero * 2^s leaves (q - zero) * 2^s; the 2^-s is folded into x, which is loaded and
  scaled once per program and shared by its BN rows. Per weight: one AND-OR (LOP3), one FADD,
  one FFMA, and one shift per word (w >> 12, for the fields that would reach the exponent);
- sums each unit's products in f32, multiplies that by the unit's scale once, and accumulates
  in f32; the result is rounded once to x's dtype. Q4_K's mins need no per-weight work:
  sum_e (dl q_e - ml) x_e = dl sum(q x) - ml sum(x), and sum(x) is per program, not per row.

The repack (repack.py) orders a block so that field j of all its words is a contiguous run of
the row: x for field j is one vector load, in the same register layout as the words.

Tiles are (BN, BB, warps, split): split > 1 gives each row several programs along K (partial
sums in f32, added after), for short N where rows alone cannot fill the GPU. `choose` times the
configs on the GPU and returns the fastest for a shape; the caller keeps it (no state here).
Without Triton (or off CUDA without the interpreter) `gemv` dequantises and multiplies in torch.
"""

from __future__ import annotations


import torch

from backends.cuda.triton_kernels.fused import on, tl, triton, usable
from backends.cuda.quant import iq4_xs
from backends.cuda.quant.repack import Packed, dequantize
from backends.cuda.triton_kernels.gemv import gpu_time  # the executor's GEMV timing: L2 flushed, launches queued

Config = tuple[int, int, int, int]  # (BN rows per program, BB units per step, warps, split of K)
# 8 rows a thread amortise x's load and scaling (BN = 8, or 16 over 2 row-warps); the first
# config is the default. Few of them: each is a compile (~1 s) the first time a shape is timed.
CONFIGS: tuple[Config, ...] = ((8, 128, 4, 1), (4, 128, 4, 1), (16, 64, 4, 1), (8, 64, 2, 1),
                               (4, 256, 8, 1), (4, 64, 4, 4))
DEFAULT: Config = CONFIGS[0]
MAGIC = 0x4B000000  # the f32 bits of 2^23
KINDS = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_0", "Q4_1", "Q5_K", "IQ4_XS")  # the kernel's KIND: index of the repacked type
REPS = 20


if triton is not None:
    from backends.cuda.quant.iq4_xs import _book

    @triton.jit
    def _x(xp, mb, OFF: tl.constexpr, EVEN: tl.constexpr):
        # x for one field of every word of the tile's units: [BB, 4] f32, a contiguous run per unit
        if EVEN:
            return tl.load(xp + OFF).to(tl.float32)
        return tl.load(xp + OFF, mask=mb[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _x8(xp, mb, EVEN: tl.constexpr):
        # x for the 8 fields of a 32-element unit's words: field j is elements 4j..4j+3
        return (_x(xp, mb, 0, EVEN), _x(xp, mb, 4, EVEN), _x(xp, mb, 8, EVEN), _x(xp, mb, 12, EVEN),
                _x(xp, mb, 16, EVEN), _x(xp, mb, 20, EVEN), _x(xp, mb, 24, EVEN), _x(xp, mb, 28, EVEN))

    @triton.jit
    def _term(w, x, magic, MASK: tl.constexpr, SUB: tl.constexpr, SCALE: tl.constexpr):
        # one field of every word, as a float: 2^23 + q * 2^s read from its bits, minus
        # 2^23 + zero * 2^s (exact), times x scaled by 2^-s
        f = ((w & MASK) | magic).to(tl.float32, bitcast=True) - SUB  # [BN, BB, 4]
        return f * (x * SCALE)[None, :, :]

    @triton.jit
    def _nib(w, h, xp, mb, magic, Z: tl.constexpr, EVEN: tl.constexpr):
        # a 4-bit unit (nibble j of word w is element 4j + w), zero point Z: the products [BN, BB, 4]
        # and the unit's x sum [BB] (Q4_K's mins need it)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x8(xp, mb, EVEN)
        t = _term(w, x0, magic, 0xF, 8388608.0 + Z, 1.0)
        t += _term(w, x1, magic, 0xF0, 8388608.0 + Z * 16.0, 0.0625)
        t += _term(w, x2, magic, 0xF00, 8388608.0 + Z * 256.0, 0.00390625)
        t += _term(w, x3, magic, 0xF000, 8388608.0 + Z * 4096.0, 0.000244140625)
        t += _term(w, x4, magic, 0xF0000, 8388608.0 + Z * 65536.0, 1.52587890625e-05)
        t += _term(h, x5, magic, 0xF00, 8388608.0 + Z * 256.0, 0.00390625)
        t += _term(h, x6, magic, 0xF000, 8388608.0 + Z * 4096.0, 0.000244140625)
        t += _term(h, x7, magic, 0xF0000, 8388608.0 + Z * 65536.0, 1.52587890625e-05)
        return t, tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), axis=1)

    @triton.jit
    def _term6(w, hs, x, magic, MASK: tl.constexpr, HMASK: tl.constexpr, SUB: tl.constexpr, SCALE: tl.constexpr):
        # a 6-bit field: nibble at bits s..s+3 of w (MASK), its top 2 bits at s+4, s+5 of hs (HMASK)
        f = (((w & MASK) | magic) | (hs & HMASK)).to(tl.float32, bitcast=True) - SUB
        return f * (x * SCALE)[None, :, :]

    @triton.jit
    def _nibh(w, hl, hh, xp, mb, magic, HM: tl.constexpr, Z: tl.constexpr, EVEN: tl.constexpr):
        # a unit of 32 with bits above its nibbles (Q6_K: 2, HM = 3; Q5_*: 1, HM = 1): nibble j
        # of word w is element 4j + w's low 4 bits, its top bits sit at 4j+4 of hl for j <= 4 and
        # at 4j-8 of hh for j >= 5 (where w >> 12 holds the nibble); zero point Z. The products
        # of elements 0..15 and of 16..31 (Q6_K has a scale for each), [BN, BB], and the x sum [BB]
        h = w >> 12
        x0, x1, x2, x3, x4, x5, x6, x7 = _x8(xp, mb, EVEN)
        t = _term6(w, hl, x0, magic, 0xF, HM * 16, 8388608.0 + Z, 1.0)
        t += _term6(w, hl, x1, magic, 0xF0, HM * 256, 8388608.0 + Z * 16.0, 0.0625)
        t += _term6(w, hl, x2, magic, 0xF00, HM * 4096, 8388608.0 + Z * 256.0, 0.00390625)
        t += _term6(w, hl, x3, magic, 0xF000, HM * 65536, 8388608.0 + Z * 4096.0, 0.000244140625)
        u = _term6(w, hl, x4, magic, 0xF0000, HM * 1048576, 8388608.0 + Z * 65536.0, 1.52587890625e-05)
        u += _term6(h, hh, x5, magic, 0xF00, HM * 4096, 8388608.0 + Z * 256.0, 0.00390625)
        u += _term6(h, hh, x6, magic, 0xF000, HM * 65536, 8388608.0 + Z * 4096.0, 0.000244140625)
        u += _term6(h, hh, x7, magic, 0xF0000, HM * 1048576, 8388608.0 + Z * 65536.0, 1.52587890625e-05)
        xs = tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), axis=1)
        return tl.sum(t, axis=2), tl.sum(u, axis=2), xs

    @triton.jit
    def _byte(v, magic, MASK: tl.constexpr, SCALE: tl.constexpr):
        # a biased byte (value + 128) at the bits of MASK as a float, by the mantissa trick
        return (((v & MASK) | magic).to(tl.float32, bitcast=True) - 8388608.0) * SCALE - 128.0

    @triton.jit
    def _int6(v, magic):
        # a 6-bit field at bits 0..5 as a float, by the same mantissa trick
        return ((v & 0x3F) | magic).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _bytes16(v, xp, mb, magic, OFF: tl.constexpr, EVEN: tl.constexpr):
        # a Q8_0 unit (byte j of word w is element 4j + w of 16, stored + 128) times x[OFF:OFF+16]
        h = v >> 12
        t = _term(v, _x(xp, mb, OFF, EVEN), magic, 0xFF, 8388736.0, 1.0)
        t += _term(v, _x(xp, mb, OFF + 4, EVEN), magic, 0xFF00, 8421376.0, 0.00390625)
        t += _term(h, _x(xp, mb, OFF + 8, EVEN), magic, 0xFF0, 8390656.0, 0.0625)
        t += _term(h, _x(xp, mb, OFF + 12, EVEN), magic, 0xFF000, 8912896.0, 0.000244140625)
        return t

    @triton.jit
    def _gemv_k(x_ptr, q_ptr, d_ptr, s_ptr, h_ptr, o_ptr, N, NU, UPS, sq, sd, ss, sh, so, magic, t0, t1, t2, t3,
                KIND: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr, PARTIAL: tl.constexpr, EVEN_N: tl.constexpr,
                EVEN: tl.constexpr, ASM: tl.constexpr):
        # program (i, s): rows [i*BN, i*BN + BN), units [s*UPS, s*UPS + UPS) of the row, BB units a
        # step. A unit is 4 words (one 16-byte load): 32 elements (KIND 0 Q4_0, 2 Q4_K) or 16 (1 Q8_0);
        # Q6_K's (KIND 3) is 64 elements: 8 words of low nibbles, 4 of top bits, 4 scale bytes.
        # t0..t3: IQ4_XS's code book (iq4_xs.py), read by byte permutes (PTX where ASM, else emulated).
        # `magic` (0x4B000000, the bits of 2^23) comes as an argument, not a literal: with the field
        # masks also literals the compiler would spend a MOV on every AND-OR; this way it is one
        # register and each AND-OR is one LOP3 with the mask as its immediate.
        # EVEN (no partial unit tile) and EVEN_N (no partial row tile) drop the predicates.
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
            qp = q_ptr + r64[:, None, None] * sq + (blk * (8 if KIND == 3 else 4))[None, :, None] + wi[None, None, :]
            if KIND == 3:
                dp = d_ptr + r64[:, None] * sd + (blk // 4)[None, :]  # [BN, BB]: four pairs share a d
            elif KIND == 1:
                dp = d_ptr + r64[:, None] * sd + (blk // 2)[None, :]  # [BN, BB]: two units share a scale
            elif KIND == 2 or KIND == 6:
                dp = d_ptr + r64[:, None] * sd + (blk // 8 * 2)[None, :]  # [BN, BB]: the super-block's d
            elif KIND == 7:
                dp = d_ptr + r64[:, None] * sd + (blk // 8)[None, :]  # [BN, BB]: the super-block's d
            elif KIND == 5:
                dp = d_ptr + r64[:, None] * sd + (blk * 2)[None, :]  # [BN, BB]: the block's (d, m)
            else:
                dp = d_ptr + r64[:, None] * sd + blk[None, :]
            if EVEN and EVEN_N:
                w = tl.load(qp)
                d = tl.load(dp).to(tl.float32)
            else:
                w = tl.load(qp, mask=mr[:, None, None] & mb[None, :, None], other=0)
                d = tl.load(dp, mask=m2, other=0.0).to(tl.float32)
            # a field at bits s..s+b-1 reads as 2^23 + q * 2^s only while it stays below bit 23 (the
            # exponent's lowest bit): the fields above come from the word shifted right by 12
            h = w >> 12  # (the sign bits it shifts in are masked off)
            if KIND == 4 or KIND == 6:  # Q5_0, Q5_K: a word per unit, bit 4j + w = element 4j + w's 5th bit
                hp = h_ptr + r64[:, None] * sh + blk[None, :]
                if EVEN and EVEN_N:
                    hq = tl.load(hp)[:, :, None]
                else:
                    hq = tl.load(hp, mask=m2, other=0)[:, :, None]
                hl = hq << (4 - wi)[None, None, :]  # bit 4j + w -> 4j + 4, right above nibble j of word w
                hh = hq >> (8 + wi)[None, None, :]  # and for the fields read from w >> 12
            if KIND == 3:  # Q6_K: w = (d * sc) * (q - 32), an int8 scale per 16 elements
                hp = h_ptr + r64[:, None, None] * sh + (blk * 4)[None, :, None] + wi[None, None, :]
                sp = s_ptr + r64[:, None] * ss + blk[None, :]
                if EVEN and EVEN_N:
                    wb = tl.load(qp + 4)
                    hw = tl.load(hp)
                    sw = tl.load(sp)
                else:
                    wb = tl.load(qp + 4, mask=mr[:, None, None] & mb[None, :, None], other=0)
                    hw = tl.load(hp, mask=mr[:, None, None] & mb[None, :, None], other=0)
                    sw = tl.load(sp, mask=m2, other=0)
                xp = x_ptr + (blk * 64)[:, None] + wi[None, :]
                a0, a1, _ = _nibh(w, hw << 4, hw >> 8, xp, mb, magic, 3, 32.0, EVEN)
                b0, b1, _ = _nibh(wb, hw << 2, hw >> 10, xp + 32, mb, magic, 3, 32.0, EVEN)
                sx = sw >> 12
                acc += ((a0 * _byte(sw, magic, 0xFF, 1.0) + a1 * _byte(sw, magic, 0xFF00, 0.00390625))
                        + (b0 * _byte(sx, magic, 0xFF0, 0.0625) + b1 * _byte(sx, magic, 0xFF000, 0.000244140625))) * d
            elif KIND == 1:  # Q8_0: byte j of word w is element 4j + w of the unit, stored q + 128
                t = _bytes16(w, x_ptr + (blk * 16)[:, None] + wi[None, :], mb, magic, 0, EVEN)
                acc += tl.sum(t, axis=2) * d  # the scale, once per unit
            elif KIND == 7:  # IQ4_XS: w = d * (ls - 32) * book[q]; the looked-up bytes are Q8_0 units
                sp = s_ptr + r64[:, None] * ss + blk[None, :]
                if EVEN and EVEN_N:
                    ls = tl.load(sp).to(tl.int32)
                else:
                    ls = tl.load(sp, mask=m2, other=0).to(tl.int32)
                xp = x_ptr + (blk * 32)[:, None] + wi[None, :]
                t = _bytes16(_book(w, t0, t1, t2, t3, ASM), xp, mb, magic, 0, EVEN)  # elements 0..15
                t += _bytes16(_book(w >> 16, t0, t1, t2, t3, ASM), xp, mb, magic, 16, EVEN)  # 16..31
                acc += tl.sum(t, axis=2) * (d * (_int6(ls, magic) - 32.0))
            elif KIND == 0:  # Q4_0: zero point 8
                t, xs = _nib(w, h, x_ptr + (blk * 32)[:, None] + wi[None, :], mb, magic, 8.0, EVEN)
                acc += tl.sum(t, axis=2) * d
            elif KIND == 4:  # Q5_0: zero point 16
                a0, a1, _ = _nibh(w, hl, hh, x_ptr + (blk * 32)[:, None] + wi[None, :], mb, magic, 1, 16.0, EVEN)
                acc += (a0 + a1) * d
            elif KIND == 5:  # Q4_1: w = d * q + m: sum_e w x = d sum(q x) + m sum(x)
                t, xs = _nib(w, h, x_ptr + (blk * 32)[:, None] + wi[None, :], mb, magic, 0.0, EVEN)
                if EVEN and EVEN_N:
                    m = tl.load(dp + 1).to(tl.float32)
                else:
                    m = tl.load(dp + 1, mask=m2, other=0.0).to(tl.float32)
                acc += tl.sum(t, axis=2) * d + m * xs[None, :]
            else:  # Q4_K, Q5_K: w = (d * sc) * q - (dmin * m): sum_e w x = d sc sum(q x) - dmin m sum(x)
                if KIND == 6:
                    a0, a1, xs = _nibh(w, hl, hh, x_ptr + (blk * 32)[:, None] + wi[None, :], mb, magic, 1, 0.0, EVEN)
                    tq = a0 + a1
                else:
                    t, xs = _nib(w, h, x_ptr + (blk * 32)[:, None] + wi[None, :], mb, magic, 0.0, EVEN)
                    tq = tl.sum(t, axis=2)
                sp = s_ptr + r64[:, None] * ss + blk[None, :]
                if EVEN and EVEN_N:
                    dmin = tl.load(dp + 1).to(tl.float32)
                    sm = tl.load(sp).to(tl.int32)
                else:
                    dmin = tl.load(dp + 1, mask=m2, other=0.0).to(tl.float32)
                    sm = tl.load(sp, mask=m2, other=0).to(tl.int32)
                acc += tq * (d * _int6(sm, magic)) - (dmin * _int6(sm >> 8, magic)) * xs[None, :]
        y = tl.sum(acc, axis=1)
        if not PARTIAL:
            y = y.to(o_ptr.dtype.element_ty)
        if EVEN_N:
            tl.store(o_ptr + tl.program_id(1) * so + rows, y)
        else:
            tl.store(o_ptr + tl.program_id(1) * so + rows, y, mask=mr)


def _check(x: torch.Tensor, p: Packed) -> None:
    n, k = p.shape
    if x.dim() != 2 or x.shape != (1, k) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quant GEMV wants x bf16/f16/f32 [1, {k}] for a {p.qtype} [{n}, {k}] weight, "
                         f"got {x.dtype} {tuple(x.shape)}")


def reference(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """Dequantise and multiply in f32, rounded to x's dtype: the fallback and the tests' oracle."""
    return (x.float() @ dequantize(p).to(x.device).T).to(x.dtype)


def _launch(x: torch.Tensor, p: Packed, cfg: Config) -> torch.Tensor:
    bn, bb, warps, split = cfg
    n, k = p.shape
    kind = KINDS.index(p.qtype)
    nu = p.qs.shape[1] // (8 if p.qtype == "Q6_K" else 4)  # units per row (Q6_K's: a pair of 32 elements)
    split = max(1, min(split, nu))
    ups = triton.cdiv(nu, split)
    bb = min(bb, triton.next_power_of_2(ups))  # a short row takes a narrower tile, not masked lanes
    part = split > 1
    even = nu % split == 0 and ups % bb == 0  # every program's units are whole tiles
    out = torch.empty((split, n) if part else (1, n), dtype=torch.float32 if part else x.dtype, device=x.device)
    with on(x):
        sub = p.d if p.sub is None else p.sub  # (stand-ins the kernel does not read)
        qh = p.d if p.qh is None else p.qh
        _gemv_k[(triton.cdiv(n, bn), split)](x, p.qs, p.d, sub, qh, out, n, nu, ups, p.qs.stride(0), p.d.stride(0),
                                             sub.stride(0), qh.stride(0), out.stride(0), MAGIC, iq4_xs.T0, iq4_xs.T1,
                                             iq4_xs.T2, iq4_xs.T3, KIND=kind, BN=bn, BB=bb, PARTIAL=part,
                                             EVEN_N=n % bn == 0, EVEN=even, ASM=iq4_xs.use_asm(), num_warps=warps,
                                             enable_fp_fusion=True)  # the products and sums as FFMAs
    return out.sum(0, keepdim=True).to(x.dtype) if part else out  # [1, N]


def gemv(x: torch.Tensor, p: Packed, cfg: Config = DEFAULT) -> torch.Tensor:
    """x [1, K] bf16/f16/f32 @ W[N, K]^T -> [1, N] in x's dtype, W as repacked blocks.
    Triton where it runs (CUDA, or the CPU under the interpreter), else torch."""
    _check(x, p)
    if not (usable(x) and p.qs.device == x.device):
        return reference(x, p)
    return _launch(x.contiguous(), p, cfg)


def choose(x: torch.Tensor, p: Packed, configs: tuple[Config, ...] = CONFIGS) -> tuple[Config, dict[Config, float]]:
    """The fastest config for this (x, p) on its GPU and every config's median ms; off CUDA
    (the interpreter) nothing is timed and DEFAULT comes back. Configs that fail to compile
    on this GPU are left out."""
    _check(x, p)
    if not (x.is_cuda and usable(x)):
        return DEFAULT, {}
    times: dict[Config, float] = {}
    failed: Exception | None = None
    for cfg in configs:
        try:
            times[cfg] = gpu_time(lambda cfg=cfg: _launch(x.contiguous(), p, cfg), x.device, REPS)
        except Exception as e:  # noqa: BLE001 - a tile this GPU cannot compile (registers, shared memory)
            failed = e
    if not times:
        raise RuntimeError(f"no quant GEMV config ran for {p.qtype} {p.shape} on {x.device}: {failed}") from failed
    return min(times, key=lambda c: times[c]), times
