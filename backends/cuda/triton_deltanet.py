"""Fused gated delta-net kernels in Triton (CUDA fast path of Op.DELTA_NET).

One program owns one value head and a block of BV value columns of its [dk, dv] state,
which stays in registers for the whole sequence: the state is read once and written once
per call, whatever T is. Decode (T = 1) is a single launch per layer instead of a dozen
small torch ops.

Prefill has two forms. `delta_net` walks the tokens one by one inside the kernel (a chain
of T dependent steps). `delta_net_chunked` does the chunked (UT-transform) form: the
intra-chunk work of every chunk at once in batched torch ops (as recurrent.delta_rule_chunked),
then one Triton kernel carries the state across the chunks with matrix products
(T/64 dependent steps instead of T). `calibrate` times both once on the device and
`prefill` uses the faster.

Semantics match transformers' torch_recurrent_gated_delta_rule: q and k l2-normalised
(eps 1e-6), q scaled by dk**-0.5, key heads shared by `nv // nk` consecutive value heads,
S ← S·exp(g); δ = β·(v − kᵀS); S ← S + k δᵀ; o = qᵀS. Output: packed [T+dk, nv, dv] f32,
rows [0,T) the outputs, rows [T, T+dk) the new state laid out [dk, nv, dv].
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference kernel in the rule table is used
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _delta_net_fwd(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s_ptr, out_ptr,
                       T, NV, R, DK, DV,
                       sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sb_t,
                       scale, L2: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
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
            g = tl.load(g_ptr + t * sg_t + h).to(tl.float32)
            beta = tl.load(b_ptr + t * sb_t + h).to(tl.float32)
            S = S * tl.exp(g)
            kv = tl.sum(S * k[:, None], axis=0)  # [BV] = kᵀS
            delta = (v - kv) * beta
            S = S + k[:, None] * delta[None, :]
            o = tl.sum(S * q[:, None], axis=0)  # [BV] = qᵀS
            tl.store(out_ptr + t * (NV * DV) + h * DV + offs_v, o, mask=mv)
        tl.store(out_ptr + T * (NV * DV) + s_idx, S, mask=m2)


def _on(t: torch.Tensor):  # type: ignore[no-untyped-def]
    from backends.cuda.fused import on

    return on(t)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def delta_net(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor, qk_l2norm: bool = True) -> torch.Tensor:
    """q,k [T,nk,dk]; v [T,nv,dv]; g,beta [T,nv]; state [dk,nv,dv] -> packed f32 [T+dk,nv,dv]."""
    T, nk, dk = q.shape
    nv, dv = v.shape[1], v.shape[2]
    # the innermost dim must be unit-stride for the vector loads; views from slices usually are
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g, beta = g.contiguous(), beta.contiguous()
    state = state.contiguous()
    out = torch.empty((T + dk, nv, dv), dtype=torch.float32, device=q.device)
    BK = triton.next_power_of_2(dk)
    BV = min(32, triton.next_power_of_2(dv))
    grid = (nv, triton.cdiv(dv, BV))
    with _on(out):
        _delta_net_fwd[grid](q, k, v, g, beta, state, out, T, nv, nv // nk, dk, dv,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             g.stride(0), beta.stride(0), dk ** -0.5, L2=qk_l2norm, BK=BK, BV=BV,
                             num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _chunk_state_fwd(w_ptr, u_ptr, qd_ptr, a_ptr, kd_ptr, last_ptr, s_ptr, out_ptr, T, NV, NCH, DV,
                         DK: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr):
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
            if LOW:  # bf16 operands, f32 accumulation (as the chunked kernels of fla do): half the tiles
                Sl = S.to(tl.bfloat16)
                vn = U - tl.dot(tl.load(w_ptr + ck).to(tl.bfloat16), Sl)  # what the state does not predict
                o = tl.dot(tl.load(qd_ptr + ck).to(tl.bfloat16), Sl)
                A = tl.load(a_ptr + base * C * C + offs_c[:, None] * C + offs_c[None, :]).to(tl.bfloat16)
                vl = vn.to(tl.bfloat16)
                o += tl.dot(A, vl)
                kdT = tl.trans(tl.load(kd_ptr + ck).to(tl.bfloat16))
                S = S * tl.load(last_ptr + base) + tl.dot(kdT, vl)
            else:
                W = tl.load(w_ptr + ck)  # [C,DK]
                vn = U - tl.dot(W, S, input_precision="ieee")  # what the state does not already predict
                Q = tl.load(qd_ptr + ck)
                A = tl.load(a_ptr + base * C * C + offs_c[:, None] * C + offs_c[None, :])  # [C,C]
                o = tl.dot(Q, S, input_precision="ieee") + tl.dot(A, vn, input_precision="ieee")
                Kd = tl.load(kd_ptr + ck)
                S = S * tl.load(last_ptr + base) + tl.dot(tl.trans(Kd), vn, input_precision="ieee")
            t = i * C + offs_c
            tl.store(out_ptr + t[:, None] * (NV * DV) + h * DV + offs_v[None, :], o,
                     mask=(t < T)[:, None] & mv[None, :])
        tl.store(out_ptr + T * (NV * DV) + s_idx, S, mask=mv[None, :])


# tile configurations, tried in order until one compiles on this GPU: (BV, warps, bf16 operands,
# pipeline stages); one stage keeps the shared memory of the dot operands under Hopper's 227 KiB
CONFIGS = ((32, 8, False, 1), (16, 4, False, 1), (32, 8, True, 1), (16, 4, True, 1))


def delta_net_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      state: torch.Tensor, qk_l2norm: bool = True, chunk: int = 64,
                      config: tuple[int, int, bool, int] | None = None) -> torch.Tensor:
    """Same contract as `delta_net`: packed f32 [T+dk, nv, dv]; dk a power of two >= 16.
    `config` (BV, warps, bf16 operands): default the first of CONFIGS that compiled here."""
    from backends.cuda.recurrent import chunk_terms

    T, dk, (nv, dv) = q.shape[0], q.shape[2], v.shape[1:]
    c = chunk_terms(q, k, v, g, beta, qk_l2norm, chunk)
    n = c.last.shape[1]
    u, w, attn, qd, kd, last = (x.contiguous() for x in c)
    out = torch.empty((T + dk, nv, dv), dtype=torch.float32, device=q.device)
    s0 = state.contiguous().to(torch.float32)
    tries = [config] if config else ([PREFILL["config"]] if PREFILL.get("config") else list(CONFIGS))
    err: Exception | None = None
    for bv, warps, low, stages in tries:
        BV = min(bv, triton.next_power_of_2(dv))
        try:
            with _on(out):
                _chunk_state_fwd[(nv, triton.cdiv(dv, BV))](w, u, qd, attn, kd, last, s0, out, T, nv, n, dv, DK=dk,
                                                            C=chunk, BV=BV, LOW=low, num_warps=warps,
                                                            num_stages=stages)
        except Exception as e:  # out of shared memory or registers for this tile: the next one
            err = e
            errs = PREFILL.setdefault("errors", [])
            if len(errs) < 8:
                errs.append(f"{(bv, warps, low, stages)}: {str(e).splitlines()[0][:160]}")
            continue
        PREFILL["config"] = (bv, warps, low, stages)
        return out
    raise RuntimeError(f"no chunked delta-net tile compiles here: {err}")


PREFILL: dict = {"impl": "chunked"}  # set by calibrate(); chunked until measured otherwise


def calibrate(device: torch.device, nk: int, nv: int, dk: int, dv: int, T: int = 2048) -> dict[str, float]:
    """Time the token-serial and the chunked prefill once on `device` (ms) and keep the faster."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(T, nk, dk, device=device, generator=gen) for _ in range(2))
    v = torch.randn(T, nv, dv, device=device, generator=gen)
    g = -torch.rand(T, nv, device=device, generator=gen)
    beta = torch.rand(T, nv, device=device, generator=gen)
    s = torch.zeros(dk, nv, dv, device=device)
    times = {}
    outs = {}
    for name, fn in (("recurrent", delta_net), ("chunked", delta_net_chunked)):
        try:
            outs[name] = fn(q, k, v, g, beta, s)  # compile
        except Exception as e:  # e.g. a tile that does not fit this GPU's shared memory: use the other
            PREFILL.setdefault("errors", []).append(f"{name}: {str(e).splitlines()[0][:200]}")
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn(q, k, v, g, beta, s)
        end.record()
        end.synchronize()
        times[name] = start.elapsed_time(end) / 3
    if "chunked" in outs and "recurrent" in outs:  # the chunked form must agree before it is used
        a, b = outs["chunked"], outs["recurrent"]
        err = float((a - b).norm() / b.norm())
        PREFILL["chunked_rel_err"] = err
        if not err < 2e-2:
            times.pop("chunked")
    PREFILL["impl"] = min(times, key=lambda n: times[n])
    return times


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor, qk_l2norm: bool = True) -> torch.Tensor:
    dk = q.shape[2]
    if PREFILL["impl"] == "chunked" and dk >= 16 and dk & (dk - 1) == 0:
        try:
            return delta_net_chunked(q, k, v, g, beta, state, qk_l2norm)
        except Exception:  # compile failure on this GPU: the token-serial kernel from now on
            PREFILL["impl"] = "recurrent"
    return delta_net(q, k, v, g, beta, state, qk_l2norm)
