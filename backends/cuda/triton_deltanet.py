"""Fused gated delta-net kernels in Triton (CUDA fast path of Op.DELTA_NET).

One program owns one value head and a block of BV value columns of its [dk, dv] state,
which stays in registers for the whole sequence: the state is read once and written once
per call, whatever T is. Decode (T = 1) is a single launch per layer instead of a dozen
small torch ops; prefill walks the tokens sequentially inside the kernel (a chunked
formulation would expose more parallelism for long prompts; see docs/results for timings).

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
    _delta_net_fwd[grid](q, k, v, g, beta, state, out, T, nv, nv // nk, dk, dv,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         g.stride(0), beta.stride(0), dk ** -0.5, L2=qk_l2norm, BK=BK, BV=BV,
                         num_warps=4)
    return out
