"""Fused gated delta-net kernels in Triton (CUDA fast path of Op.DELTA_NET).

One program owns one value head and a block of BV value columns of its [dk, dv] state,
which stays in registers for the whole sequence: the state is read once and written once
per call, whatever T is. Decode (T = 1) is a single launch per layer instead of a dozen
small torch ops.

Prefill has two forms. `delta_net` walks the tokens one by one inside the kernel (a chain
of T dependent steps). `delta_net_chunked` does the chunked (UT-transform) form in two
launches: `_chunk_prep_fwd` makes the intra-chunk terms of every (chunk, head) at once
(what recurrent.chunk_terms does with a dozen torch ops and a batched triangular solve: here
the unit lower-triangular 64×64 system is inverted in registers, 16-row diagonal blocks by
forward substitution and the rest with four products), then `_chunk_state_fwd` carries the
state across the chunks with tensor-core products (T/64 dependent steps instead of T).
Whatever does not compile on a GPU falls back: tf32 tiles to exact f32 ones, the fused terms
to the torch ones. Which form a prefill uses is chosen by timing in deltanet_prefill.py.

Semantics match transformers' torch_recurrent_gated_delta_rule: q and k l2-normalised
(eps 1e-6), q scaled by dk**-0.5, key heads shared by `nv // nk` consecutive value heads,
S ← S·exp(g); δ = β·(v − kᵀS); S ← S + k δᵀ; o = qᵀS. Output: packed [T+dk, nv, dv] f32,
rows [0,T) the outputs, rows [T, T+dk) the new state laid out [dk, nv, dv].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from backends.cuda.runtime.choices import KernelChoices, or_fresh

if TYPE_CHECKING:
    from backends.cuda.reference.recurrent import ChunkTerms

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference kernel in the rule table is used
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _delta_net_fwd(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s_ptr, out_ptr, so_ptr, dtb_ptr, ad_ptr,
                       T, NV, R, DK, DV,
                       sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sb_t,
                       scale, L2: tl.constexpr, RAW: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        h = tl.program_id(0)
        vb = tl.program_id(1)
        kh = h // R
        offs_k = tl.arange(0, BK)
        offs_v = vb * BV + tl.arange(0, BV)
        mk = offs_k < DK
        mv = offs_v < DV
        # state block [BK, BV] of head h; layout [dk, nv, dv]
        s_idx = offs_k[:, None] * (NV * DV) + h * DV + offs_v[None, :]
        m2 = mk[:, None] & mv[None, :]
        S = tl.load(s_ptr + s_idx, mask=m2, other=0.0).to(tl.float32)
        for t in range(0, T):
            q = tl.load(q_ptr + t * sq_t + kh * sq_h + offs_k, mask=mk, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + t * sk_t + kh * sk_h + offs_k, mask=mk, other=0.0).to(tl.float32)
            if L2:
                q = q / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6)
                k = k / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6)
            q = q * scale
            v = tl.load(v_ptr + t * sv_t + h * sv_h + offs_v, mask=mv, other=0.0).to(tl.float32)
            if RAW:  # g_ptr, b_ptr hold the projections: the gates are made here (recurrent.raw_gates)
                x = tl.load(g_ptr + t * sg_t + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
                sp = tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))  # softplus
                g = sp * tl.load(ad_ptr + h).to(tl.float32)
                braw = tl.load(b_ptr + t * sb_t + h)
                beta = (1.0 / (1.0 + tl.exp(-braw.to(tl.float32)))).to(braw.dtype).to(tl.float32)
            else:
                g = tl.load(g_ptr + t * sg_t + h).to(tl.float32)
                beta = tl.load(b_ptr + t * sb_t + h).to(tl.float32)
            S = S * tl.exp(g)
            kv = tl.sum(S * k[:, None], axis=0)  # [BV] = kᵀS
            delta = (v - kv) * beta
            S = S + k[:, None] * delta[None, :]
            o = tl.sum(S * q[:, None], axis=0)  # [BV] = qᵀS
            tl.store(out_ptr + t * (NV * DV) + h * DV + offs_v, o, mask=mv)
        # each program owns its [BK, BV] block: read whole before this write, so so_ptr may be s_ptr
        tl.store(so_ptr + s_idx, S, mask=m2)


def _on(t: torch.Tensor):  # type: ignore[no-untyped-def]
    from backends.cuda.triton_kernels.fused import on

    return on(t)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def delta_net(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor, qk_l2norm: bool = True, state_out: torch.Tensor | None = None,
              raw: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q,k [T,nk,dk]; v [T,nv,dv]; g,beta [T,nv]; state [dk,nv,dv] -> packed f32 [T+dk,nv,dv].
    With `state_out` (contiguous f32 [dk,nv,dv], may be `state` itself) the new state is written
    there instead, and the packed result's state rows are left unwritten: a decode step that keeps
    its state in place saves a 2 MB copy and a launch per layer. With `raw` = (dt_bias [nv],
    a [nv]), g and beta are the projections alpha and b, and the gates are made in the kernel
    (recurrent.raw_gates): five launches less per layer and token."""
    T, nk, dk = q.shape
    nv, dv = v.shape[1], v.shape[2]
    # the innermost dim must be unit-stride for the vector loads; views from slices usually are
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g, beta = (x if x.stride(-1) == 1 else x.contiguous() for x in (g, beta))  # rows by stride(0)
    state = state.contiguous()
    out = torch.empty((T + dk, nv, dv), dtype=torch.float32, device=q.device)
    so = out[T:] if state_out is None else state_out
    if so.shape != (dk, nv, dv) or so.dtype != torch.float32 or not so.is_contiguous():
        raise ValueError(f"state_out must be contiguous f32 {[dk, nv, dv]}, got {so.dtype} {list(so.shape)}")
    BK = triton.next_power_of_2(dk)
    BV = min(32, triton.next_power_of_2(dv))
    grid = (nv, triton.cdiv(dv, BV))
    with _on(out):
        dtb, ad = (g, g) if raw is None else (raw[0].contiguous(), raw[1].contiguous())
        _delta_net_fwd[grid](q, k, v, g, beta, state, out, so, dtb, ad, T, nv, nv // nk, dk, dv,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             g.stride(0), beta.stride(0), dk ** -0.5, L2=qk_l2norm, RAW=raw is not None,
                             BK=BK, BV=BV,
                             num_warps=4)
    return out



if triton is not None:

    @triton.jit
    def _chunk_prep_fwd(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, u_ptr, w_ptr, a_ptr, qd_ptr, kd_ptr, last_ptr,
                        T, R, NCH, DV, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sb_t, sb_h, scale,
                        DK: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr, BS: tl.constexpr,
                        L2: tl.constexpr, PREC: tl.constexpr):
        """The intra-chunk terms of one (chunk, value head), as recurrent.chunk_terms computes them:
        the raw inputs are read in place (key head h // R, any float dtype), so no repeated,
        transposed or padded copies are made; rows past T read as zeros (beta = g = 0)."""
        i = tl.program_id(0)  # chunk
        h = tl.program_id(1)  # value head
        kh = h // R
        rows = tl.arange(0, C)
        t = i * C + rows
        mt = t < T
        offs_k = tl.arange(0, DK)
        offs_v = tl.arange(0, BDV)
        mv = offs_v < DV
        base = h * NCH + i
        ck = base * C * DK + rows[:, None] * DK + offs_k[None, :]
        r_ = rows[:, None]
        c_ = rows[None, :]
        g = tl.load(g_ptr + t * sg_t + h * sg_h, mask=mt, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + t * sb_t + h * sb_h, mask=mt, other=0.0).to(tl.float32)
        G = tl.cumsum(g, axis=0)  # [C] log decay from the chunk start
        g_end = tl.sum(g, axis=0)  # log decay over the whole chunk
        eG = tl.exp(G)
        # exp only where it is used: above the diagonal G_i - G_j > 0 could overflow
        decay = tl.where(r_ >= c_, tl.exp(G[:, None] - G[None, :]), 0.0)  # [C,C]
        k = tl.load(k_ptr + t[:, None] * sk_t + kh * sk_h + offs_k[None, :], mask=mt[:, None],
                    other=0.0).to(tl.float32)  # [C,DK]
        if L2:
            k = k / tl.sqrt(tl.sum(k * k, axis=1) + 1e-6)[:, None]
        kT = tl.trans(k)
        # the query side first (its outputs written as soon as made): fewer [C,DK] tiles live at once
        q = tl.load(q_ptr + t[:, None] * sq_t + kh * sq_h + offs_k[None, :], mask=mt[:, None],
                    other=0.0).to(tl.float32)
        if L2:
            q = q / tl.sqrt(tl.sum(q * q, axis=1) + 1e-6)[:, None]
        q = q * scale
        tl.store(a_ptr + base * C * C + r_ * C + c_, tl.dot(q, kT, input_precision=PREC) * decay)  # diagonal kept
        tl.store(qd_ptr + ck, q * eG[:, None])
        # kd stored transposed, [DK,C] per chunk: the state kernel's kdᵀ·v then reads a K-major
        # operand (tf32 tensor-core products do not take a transposed f32 one on every GPU)
        tl.store(kd_ptr + base * C * DK + offs_k[None, :] * C + r_, k * tl.exp(g_end - G)[:, None])
        tl.store(last_ptr + base, tl.exp(g_end))
        kb = k * beta[:, None]
        A = tl.where(r_ > c_, tl.dot(kb, kT, input_precision=PREC) * decay, 0.0)  # strict lower part
        # (I + A)⁻¹ in two steps. First the BS×BS diagonal blocks by forward substitution, all
        # blocks at once: step s solves row s of every block. D stays block diagonal, so one
        # reduction over D's rows gives, in each block's own columns, that block's new row.
        same = (r_ // BS) == (c_ // BS)
        eye = tl.where(r_ == c_, 1.0, 0.0)
        AT = tl.trans(tl.where(same, A, 0.0))  # [j,r]: the in-block couplings, transposed
        D = eye
        for s in range(1, BS):  # row 0 of every block is already the identity's
            x = tl.sum(tl.where(c_ == (r_ // BS) * BS + s, AT, 0.0), axis=1)  # [C]: A[row s of j's block, j]
            y = tl.sum(x[:, None] * D, axis=0)  # [C]
            D = tl.where(same & (r_ % BS == s), eye - y[None, :], D)
        # then the blocks below the diagonal: I + A = B(I + N) with B the block-diagonal part,
        # N = D·O strictly block lower, so N⁴ = 0 (C <= 4·BS) and (I+A)⁻¹ = (I - N)(I + N²)D
        N = tl.dot(D, tl.where(same, 0.0, A), input_precision=PREC)
        X = eye - N
        P = X + tl.dot(X, tl.dot(N, N, input_precision=PREC), input_precision=PREC)
        M = tl.dot(P, D, input_precision=PREC)  # [C,C] unit lower: (I + A)⁻¹
        tl.store(w_ptr + ck, tl.dot(M, kb * eG[:, None], input_precision=PREC))  # [C,DK]
        v = tl.load(v_ptr + t[:, None] * sv_t + h * sv_h + offs_v[None, :], mask=mt[:, None] & mv[None, :],
                    other=0.0).to(tl.float32)  # [C,BDV]
        u = tl.dot(M, v * beta[:, None], input_precision=PREC)
        tl.store(u_ptr + base * C * DV + r_ * DV + offs_v[None, :], u, mask=mv[None, :])

    @triton.jit
    def _chunk_state_fwd(w_ptr, u_ptr, qd_ptr, a_ptr, kd_ptr, last_ptr, s_ptr, out_ptr, T, NV, NCH, DV,
                         skd_c, skd_k, DK: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr,
                         PREC: tl.constexpr):
        h = tl.program_id(0)
        vb = tl.program_id(1)
        offs_k = tl.arange(0, DK)
        offs_c = tl.arange(0, C)
        offs_v = vb * BV + tl.arange(0, BV)
        mv = offs_v < DV
        s_idx = offs_k[:, None] * (NV * DV) + h * DV + offs_v[None, :]
        S = tl.load(s_ptr + s_idx, mask=mv[None, :], other=0.0).to(tl.float32)  # [DK,BV]
        for i in range(0, NCH):
            base = h * NCH + i
            ck = base * C * DK + offs_c[:, None] * DK + offs_k[None, :]
            cv = base * C * DV + offs_c[:, None] * DV + offs_v[None, :]
            U = tl.load(u_ptr + cv, mask=mv[None, :], other=0.0)  # [C,BV]
            kd_idx = base * C * DK + offs_k[:, None] * skd_k + offs_c[None, :] * skd_c  # [DK,C] tile of kdᵀ
            if LOW:  # bf16 operands, f32 accumulation (as the chunked kernels of fla do): half the tiles
                Sl = S.to(tl.bfloat16)
                vn = U - tl.dot(tl.load(w_ptr + ck).to(tl.bfloat16), Sl)  # what the state does not predict
                o = tl.dot(tl.load(qd_ptr + ck).to(tl.bfloat16), Sl)
                A = tl.load(a_ptr + base * C * C + offs_c[:, None] * C + offs_c[None, :]).to(tl.bfloat16)
                vl = vn.to(tl.bfloat16)
                o += tl.dot(A, vl)
                S = S * tl.load(last_ptr + base) + tl.dot(tl.load(kd_ptr + kd_idx).to(tl.bfloat16), vl)
            else:  # f32 operands: "tf32" runs on the tensor cores, "ieee" is exact but several times slower
                W = tl.load(w_ptr + ck)  # [C,DK]
                vn = U - tl.dot(W, S, input_precision=PREC)  # what the state does not already predict
                Q = tl.load(qd_ptr + ck)
                A = tl.load(a_ptr + base * C * C + offs_c[:, None] * C + offs_c[None, :])  # [C,C]
                o = tl.dot(Q, S, input_precision=PREC) + tl.dot(A, vn, input_precision=PREC)
                S = S * tl.load(last_ptr + base) + tl.dot(tl.load(kd_ptr + kd_idx), vn, input_precision=PREC)
            t = i * C + offs_c
            tl.store(out_ptr + t[:, None] * (NV * DV) + h * DV + offs_v[None, :], o,
                     mask=(t < T)[:, None] & mv[None, :])
        tl.store(out_ptr + T * (NV * DV) + s_idx, S, mask=mv[None, :])


# State-kernel tiles: (BV, warps, operands, pipeline stages). Before calibrate() the first that
# compiles here is used; calibrate() times them all and keeps the fastest that agrees. Operands
# "tf32" (tensor cores, f32 storage), "ieee" (exact f32 FMA, the slow fallback) or "bf16". BV 16
# gives nv·dv/16 programs, twice the parallelism of 32 for the serial chunk walk; at dk 128 the
# f32 tiles fill the registers either way (sm_90 build: 255, some spilled; 8 warps with BV 16
# spill nothing but run one program per SM), so which is faster is measured, not assumed. One
# stage keeps the shared memory of the dot operands (about 100 KiB at dk 128) under Hopper's 227
# KiB. The intra-chunk kernel uses tf32 dots unless the tile says "ieee".
CONFIGS: tuple[tuple[int, int, str, int], ...] = (
    (16, 4, "tf32", 1), (32, 8, "tf32", 1), (16, 8, "tf32", 1), (32, 8, "bf16", 1), (16, 4, "bf16", 1),
    (32, 8, "ieee", 1), (16, 4, "ieee", 1))
PRECISIONS = ("tf32", "bf16", "ieee")  # preference: tf32 ~ bf16 in speed on an H200 (0.51 ms), more exact
PREP_WARPS = (8, 4)  # intra-chunk kernel: [C,dk] f32 tiles of q, k and k·beta live together


def note_failure(chosen: dict, what: object, e: Exception) -> None:
    errs = chosen.setdefault("errors", [])
    if len(errs) < 8:
        errs.append(f"{what}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")


def _fusable(chunk: int, dk: int) -> bool:
    return chunk in (16, 32, 64) and dk >= 16 and dk & (dk - 1) == 0


def chunk_terms_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      qk_l2norm: bool = True, chunk: int = 64, precision: str = "tf32",
                      warps: int = 8) -> ChunkTerms:
    """recurrent.chunk_terms in one Triton launch (grid: chunks × value heads); same ChunkTerms,
    f32, contiguous but kd (a transposed view: stored [dk,C] per chunk). q,k [T,nk,dk] (dk a power of two >= 16), v [T,nv,dv], g,beta [T,nv];
    chunk 16, 32 or 64 (the block inverse assumes at most four 16-row blocks)."""
    from backends.cuda.reference.recurrent import ChunkTerms

    T, nk, dk = q.shape
    nv, dv = v.shape[1], v.shape[2]
    if not _fusable(chunk, dk):
        raise ValueError(f"fused chunk terms need chunk 16/32/64 and dk a power of two >= 16, got {chunk}, {dk}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    n = triton.cdiv(T, chunk)
    f32, dev = torch.float32, q.device
    u = torch.empty((nv, n, chunk, dv), dtype=f32, device=dev)
    w, qd, kdT = (torch.empty((nv, n, chunk, dk), dtype=f32, device=dev) for _ in range(3))
    attn = torch.empty((nv, n, chunk, chunk), dtype=f32, device=dev)
    last = torch.empty((nv, n), dtype=f32, device=dev)
    with _on(u):
        _chunk_prep_fwd[(n, nv)](q, k, v, g, beta, u, w, attn, qd, kdT, last, T, nv // nk, n, dv,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                 g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), dk ** -0.5,
                                 DK=dk, BDV=max(16, triton.next_power_of_2(dv)), C=chunk, BS=16,
                                 L2=qk_l2norm, PREC=precision, num_warps=warps)
    kd = kdT.view(nv, n, dk, chunk).transpose(-1, -2)  # [nv,n,C,dk], stored [dk,C] per chunk
    return ChunkTerms(u, w, attn, qd, kd, last)


def _terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
           qk_l2norm: bool, chunk: int, precision: str, prep: str | None, chosen: dict) -> ChunkTerms:
    """The intra-chunk terms: the fused kernel, else (it does not compile here, or prep="torch")
    the batched torch ops of recurrent.chunk_terms."""
    from backends.cuda.reference.recurrent import ChunkTerms, chunk_terms

    if prep == "fused" or (prep is None and chosen.get("prep") != "torch" and _fusable(chunk, q.shape[2])):
        warps = [chosen["prep_warps"]] if chosen.get("prep_warps") else list(PREP_WARPS)
        for wp in warps:
            try:
                terms = chunk_terms_fused(q, k, v, g, beta, qk_l2norm, chunk, precision, wp)
            except Exception as e:  # shared memory, registers, or a shape it does not take
                note_failure(chosen, ("prep", wp, precision), e)
                continue
            chosen["prep_warps"] = wp
            return terms
        if prep == "fused":
            raise RuntimeError("the fused intra-chunk kernel does not compile here")
        chosen["prep"] = "torch"  # it does not compile on this GPU: do not retry on every call
    return ChunkTerms(*(x.contiguous() for x in chunk_terms(q, k, v, g, beta, qk_l2norm, chunk)))  # kd [C,dk]


def delta_net_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      state: torch.Tensor, qk_l2norm: bool = True, chunk: int = 64,
                      config: tuple[int, int, str, int] | None = None, prep: str | None = None,
                      choices: KernelChoices | None = None) -> torch.Tensor:
    """Same contract as `delta_net`: packed f32 [T+dk, nv, dv]; dk a power of two >= 16.
    `config` (BV, warps, operands, stages): default the first of CONFIGS that compiled here.
    `prep`: "fused" or "torch" forces how the intra-chunk terms are made (default: fused if it compiles).
    What compiled is kept in `choices.deltanet_prefill`."""
    chosen = or_fresh(choices).deltanet_prefill
    T, dk, (nv, dv) = q.shape[0], q.shape[2], v.shape[1:]
    out = torch.empty((T + dk, nv, dv), dtype=torch.float32, device=q.device)
    s0 = state.contiguous().to(torch.float32)
    tries = [config] if config else ([chosen["config"]] if chosen.get("config") else list(CONFIGS))
    terms: dict[str, ChunkTerms] = {}  # by intra-chunk precision, shared by the tiles tried
    err: Exception | None = None
    for bv, warps, ops, stages in tries:
        pp = "ieee" if ops == "ieee" else "tf32"
        if pp not in terms:
            terms[pp] = _terms(q, k, v, g, beta, qk_l2norm, chunk, pp, prep, chosen)
        u, w, attn, qd, kd, last = terms[pp]
        BV = min(bv, triton.next_power_of_2(dv))
        try:
            with _on(out):
                _chunk_state_fwd[(nv, triton.cdiv(dv, BV))](
                    w, u, qd, attn, kd, last, s0, out, T, nv, last.shape[1], dv, kd.stride(2), kd.stride(3),
                    DK=dk, C=chunk, BV=BV, LOW=ops == "bf16", PREC="ieee" if ops == "ieee" else "tf32",
                    num_warps=warps, num_stages=stages)
        except Exception as e:  # out of shared memory or registers for this tile: the next one
            err = e
            note_failure(chosen, (bv, warps, ops, stages), e)
            continue
        if config is None:
            chosen["config"] = (bv, warps, ops, stages)
        return out
    raise RuntimeError(f"no chunked delta-net tile compiles here: {err}")
