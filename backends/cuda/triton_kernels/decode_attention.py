"""One query token against a KV cache in two launches (split-K "flash decoding").

A decode step's attention is one query row per head over a cache of S rows, with the rows
past the token's position (a device-side counter, decode_step.DecodeStep) masked. As torch ops
that is a mask, a product, a scale, a masked fill, a softmax, a cast and a second product:
nine launches, each tiny at a short cache. Here:

1. `_split_k`: one program per (KV head, split of SPLIT cache rows) holds the head's G query
   heads (GQA) as a [G, d] block, walks its rows up to the position in blocks of BS, and
   keeps the online-softmax triple (running max m, sum l, weighted sum of values) per query
   head; splits wholly past the position do no work. Many splits keep the GPU busy at a
   long cache; at a short one the work is as small as the valid rows.
2. `_combine_k`: one program per query head merges the valid splits' triples, up to 64 at a
   time.

A sliding window of W rows (gpt-oss, Gemma) starts the walk at row pos-W+1: splits wholly
before it do no work and the combine starts at the first split the window touches, so a
windowed layer reads W rows, not the cache. Attention sinks (gpt-oss: one logit per query
head that joins the softmax without a value) enter in the combine, as one more term of the
normaliser: out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^sink).

A cache in ggml's q8_0 or q4_0 blocks (reference/kv_quant.py: per row and KV head, d/32 blocks of an
f16 scale and the quants) is read as its bytes: each block's quants and scale are loaded and
dequantised in registers to the activation type, the same values the reference's dequantisation
gives, so the step reads 34 (q8_0) or 18 (q4_0) bytes per 32 values instead of a dequantised copy.

Rounding: scores are rounded to the activation type, scaled, and rounded again, as the
reference (a bf16 product, times the scale in bf16) rounds them; the unnormalised
probabilities are rounded to that type before they weight the values (the reference rounds
the normalised ones) and the sum that normalises them is taken over the rounded values in
f32: results agree with the reference within the activation type's rounding, not bit for bit.
"""

from __future__ import annotations

import torch

from backends.cuda.triton_kernels.fused import INTERPRET, on, tl, triton, usable

MAX_HEAD_DIM = 256  # a [G, d] query block and [BS, d] key / value blocks in registers


# cache storage -> the kernel's QK / QV code: 0 the activation type, 1 q8_0, 2 q4_0 blocks
CACHE_CODES = {None: 0, "q8_0": 1, "q4_0": 2}
BLOCK_BYTES = {1: 34, 2: 18}  # bytes per 32 values


if triton is not None:

    @triton.jit
    def _rows(ptr, rs, h, s_s, s_h, od, mask, Q: tl.constexpr, dtype: tl.constexpr):
        # cache rows rs of KV head h, elements od: [BS, BD] in `dtype`; Q: the storage (CACHE_CODES)
        base = ptr + rs[:, None].to(tl.int64) * s_s + h * s_h
        if Q == 0:
            return tl.load(base + od[None, :], mask=mask, other=0.0)
        blk = od // 32
        j = od % 32
        bb = base + blk[None, :] * (34 if Q == 1 else 18)  # the element's block
        lo = tl.load(bb, mask=mask, other=0).to(tl.int32)
        hi = tl.load(bb + 1, mask=mask, other=0).to(tl.int32)
        d = (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # the f16 scale
        if Q == 1:
            v = tl.load(bb + 2 + j[None, :], mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        else:  # element j in the low nibble of byte j % 16 for j < 16, the high one after
            byte = tl.load(bb + 2 + (j % 16)[None, :], mask=mask, other=0).to(tl.int32)
            v = (tl.where((j < 16)[None, :], byte & 15, byte >> 4) - 8).to(tl.float32)
        return (v * d).to(dtype)  # f32 product, rounded once: kv_quant.dequantize's values

    @triton.jit
    def _split_k(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, a_ptr, sq_h, sk_s, sk_h, sv_s, sv_h, NS, SPLIT, scale,
                 WINDOW, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr,
                 BDV: tl.constexpr, BS: tl.constexpr, F32_DOT: tl.constexpr, QK: tl.constexpr = 0,
                 QV: tl.constexpr = 0):
        h = tl.program_id(0)
        sp = tl.program_id(1)
        last = tl.load(pos_ptr).to(tl.int32)  # the newest valid cache row
        rg = tl.arange(0, GP)
        od = tl.arange(0, BD)
        ov = tl.arange(0, BDV)
        md, mv = od < D, ov < DV
        q = tl.load(q_ptr + (h * G + rg)[:, None] * sq_h + od[None, :], mask=(rg < G)[:, None] & md[None, :],
                    other=0.0)  # [GP,BD]
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, BDV], dtype=tl.float32)
        start = sp * SPLIT
        end = tl.minimum(start + SPLIT, last + 1)  # a split past the position runs no block
        if WINDOW > 0:  # rows before pos-W+1 are outside the window: a split before it runs none
            start = tl.maximum(start, last - WINDOW + 1)
        for s0 in range(start, end, BS):
            rs = s0 + tl.arange(0, BS)
            ms = rs < end
            kb = _rows(k_ptr, rs, h, sk_s, sk_h, od, ms[:, None] & md[None, :], QK, q_ptr.dtype.element_ty)  # [BS,BD]
            if F32_DOT:  # Triton's CPU interpreter multiplies 16-bit floats wrongly (tests only)
                s = tl.dot(q.to(tl.float32), tl.trans(kb.to(tl.float32)))
            else:
                s = tl.dot(q, tl.trans(kb))  # [GP,BS] f32
            s = (s.to(q.dtype).to(tl.float32) * scale).to(q.dtype).to(tl.float32)
            s = tl.where(ms[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a valid row
            alpha = tl.exp(m_i - m_new)
            # the values are weighted by probabilities in their type: sum those, so the weights
            # still sum to one after rounding
            p = tl.exp(s - m_new[:, None]).to(q_ptr.dtype.element_ty)
            l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
            vb = _rows(v_ptr, rs, h, sv_s, sv_h, ov, ms[:, None] & mv[None, :], QV, q_ptr.dtype.element_ty)  # [BS,BDV]
            if F32_DOT:
                pv = tl.dot(p.to(tl.float32), vb.to(tl.float32))
            else:
                pv = tl.dot(p, vb)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        row = (h * NS + sp) * GP + rg
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)
        tl.store(a_ptr + row[:, None] * BDV + ov[None, :], acc)

    @triton.jit
    def _combine_k(pos_ptr, m_ptr, l_ptr, a_ptr, o_ptr, sink_ptr, NS, SPLIT, WINDOW, G: tl.constexpr,
                   GP: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, CB: tl.constexpr, SINK: tl.constexpr):
        # CB splits at a time (vector loads, not one dependent load per split)
        qh = tl.program_id(0)
        h = qh // G
        gi = qh % G
        ov = tl.arange(0, BDV)
        cb = tl.arange(0, CB)
        last = tl.load(pos_ptr).to(tl.int32)
        n_valid = last // SPLIT + 1
        first = 0  # the first split holding a valid row (split 0 holds row 0)
        if WINDOW > 0:
            first = tl.maximum(last - WINDOW + 1, 0) // SPLIT
        m = tl.full([1], float("-inf"), tl.float32)
        l = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BDV], dtype=tl.float32)
        for s0 in range(first, n_valid, CB):
            sp = s0 + cb
            ok = sp < n_valid
            row = (h * NS + sp) * GP + gi
            mi = tl.load(m_ptr + row, mask=ok, other=float("-inf"))  # [CB]
            li = tl.load(l_ptr + row, mask=ok, other=0.0)
            ai = tl.load(a_ptr + row[:, None] * BDV + ov[None, :], mask=ok[:, None], other=0.0)  # [CB,BDV]
            m_new = tl.maximum(m, tl.max(mi, axis=0))  # finite: the first block holds the first valid split
            a_old = tl.exp(m - m_new)
            wi = tl.exp(mi - m_new)  # 0 for the masked splits
            l = l * a_old + tl.sum(li * wi, axis=0)
            acc = acc * a_old + tl.sum(ai * wi[:, None], axis=0)
            m = m_new
        if SINK:  # the sink logit in the activation type, as the reference casts it
            sk = tl.load(sink_ptr + qh + tl.zeros([1], dtype=tl.int32)).to(o_ptr.dtype.element_ty).to(tl.float32)
            m_new = tl.maximum(m, sk)
            a_old = tl.exp(m - m_new)
            l = l * a_old + tl.exp(sk - m_new)
            acc = acc * a_old
        tl.store(o_ptr + qh * DV + ov, (acc / l).to(o_ptr.dtype.element_ty), mask=ov < DV)


def head_dim(t: torch.Tensor, cache: str | None) -> int:
    """A cache tensor's values per row and head (a block cache's last dim counts bytes)."""
    code = CACHE_CODES.get(cache, -1)
    return t.shape[-1] if code == 0 else t.shape[-1] // BLOCK_BYTES.get(code, t.shape[-1] + 1) * 32


def usable_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: str | None = None,
               v_cache: str | None = None) -> bool:
    """One query row of a 16-bit type, a cache of the same type (or of q8_0 / q4_0 blocks, named
    by `k_cache` / `v_cache`, as raw bytes) with unit-stride rows, heads that divide, head dims
    up to MAX_HEAD_DIM (the blocks live in registers)."""
    if k_cache not in CACHE_CODES or v_cache not in CACHE_CODES:
        return False
    typed = all((t.dtype == torch.uint8) if c else (t.dtype == q.dtype) for t, c in ((k, k_cache), (v, v_cache)))
    return (usable(q) and q.dim() == 3 and q.shape[0] == 1 and q.dtype in (torch.bfloat16, torch.float16)
            and typed and k.dim() == v.dim() == 3 and k.shape[1] == v.shape[1]
            and q.shape[1] % k.shape[1] == 0 and q.shape[2] == head_dim(k, k_cache) <= MAX_HEAD_DIM
            and head_dim(v, v_cache) <= MAX_HEAD_DIM and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def split_rows(S: int, hkv: int, block: int) -> int:
    """Cache rows per split: enough splits over the KV heads to fill a large GPU (~256
    programs) at a long cache, never fewer rows than one block."""
    want = -(-S * hkv // 256)
    return max(block, min(4096, triton.next_power_of_2(max(1, want))))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     scale: float, split: int | None = None, window: int | None = None,
                     sinks: torch.Tensor | None = None, k_cache: str | None = None,
                     v_cache: str | None = None) -> torch.Tensor:
    """q [1,hq,d]; k [S,hkv,d], v [S,hkv,dv] (cache rows, the new token's already written; for a
    `k_cache` / `v_cache` of "q8_0" or "q4_0", uint8 [S,hkv,d/32 * block bytes]);
    pos: int [1] on the device, the newest valid row -> [1,hq,dv] in q's type. `split`:
    cache rows per split (benchmarks; a multiple of the block), else split_rows'. `window`:
    only rows pos-window+1 .. pos are seen; `sinks` [hq]: one extra softmax logit per head."""
    _, hq, d = q.shape
    S, hkv, dv = v.shape[0], v.shape[1], head_dim(v, v_cache)
    G = hq // hkv
    GP = max(16, triton.next_power_of_2(G))  # tl.dot wants 16 rows at least
    BD, BDV = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    BS = 32 if max(BD, BDV) > 128 else 64
    W = int(window) if window else 0
    SPLIT = split or split_rows(min(S, W) if W else S, hkv, BS)  # a window's rows, not the cache's
    NS = triton.cdiv(S, SPLIT)
    CB = min(64, max(2, triton.next_power_of_2(NS)))  # splits the combine merges per step
    dev = q.device
    m = torch.empty((hkv, NS, GP), dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    a = torch.empty((hkv, NS, GP, BDV), dtype=torch.float32, device=dev)
    out = torch.empty((1, hq, dv), dtype=q.dtype, device=dev)
    with on(out):
        _split_k[(hkv, NS)](q, k, v, pos, m, l, a, q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                            NS, SPLIT, float(scale), W, G=G, GP=GP, D=d, BD=BD, DV=dv, BDV=BDV, BS=BS, F32_DOT=INTERPRET,
                            QK=CACHE_CODES[k_cache], QV=CACHE_CODES[v_cache], num_warps=4 if max(BD, BDV) <= 128 else 8)
        _combine_k[(hq,)](pos, m, l, a, out, sinks if sinks is not None else m, NS, SPLIT, W, G=G, GP=GP, DV=dv,
                          BDV=BDV, CB=CB, SINK=sinks is not None, num_warps=4 if CB * BDV <= 4096 else 8)
    return out
