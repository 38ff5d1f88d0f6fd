"""Fused Triton kernels for the small ops of the CUDA rule table (one launch each).

On a GPU a decode step is a few hundred tiny kernels; in the reference table an RMS norm is
seven torch launches, RoPE about fifteen. Each kernel here does one op in one launch with the
reference table's rounding points (values rounded to the activation type where torch rounds
them), so results agree with kernels.py to the last bit or two.

Every wrapper takes the tensors the rule receives; `usable(t)` says whether Triton can run on
that tensor's device (CUDA, or the CPU under Triton's interpreter, which the tests use).
Rows are addressed by (stride_t, stride_h) so strided views (slices of a merged projection)
need no copy; the last dim must be unit-stride.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the rule table keeps the reference kernels
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # set by the test runner, not a product switch


def usable(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or INTERPRET)


def on(t: torch.Tensor) -> Any:
    """Triton launches on the *current* device's stream: make it the tensor's (several GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """View x as rows of its last dim indexed by (t, h): (x, n_t, n_h, stride_t, stride_h)."""
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.contiguous()
    if x.dim() == 1:
        return x, 1, 1, 0, 0
    if x.dim() == 2:
        return x, x.shape[0], 1, x.stride(0), 0
    return x, x.shape[0], x.shape[1], x.stride(0), x.stride(1)


if triton is not None:

    @triton.jit
    def _rms_norm_k(x_ptr, w_ptr, o_ptr, NH, D, sx_t, sx_h, eps, OFFSET: tl.constexpr, HAS_OFF: tl.constexpr,
                    BLOCK: tl.constexpr):
        r = tl.program_id(0)
        t = r // NH
        h = r % NH
        offs = tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(x_ptr + t * sx_t + h * sx_h + offs, mask=m, other=0.0)
        xf = x.to(tl.float32)
        y = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_OFF:
            out = y * (OFFSET + w)  # Qwen3NextRMSNorm: (1 + w) in f32, then cast
        else:
            out = y.to(x.dtype).to(tl.float32) * w  # LlamaRMSNorm: cast, then times w in x's type
        tl.store(o_ptr + r * D + offs, out.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rms_norm_gated_k(x_ptr, z_ptr, w_ptr, o_ptr, NH, D, sx_t, sx_h, sz_t, sz_h, eps, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        t = r // NH
        h = r % NH
        offs = tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(x_ptr + t * sx_t + h * sx_h + offs, mask=m, other=0.0)
        xf = x.to(tl.float32)
        y = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = (w * y).to(x.dtype).to(tl.float32)  # w * norm(x) in x's type
        z = tl.load(z_ptr + t * sz_t + h * sz_h + offs, mask=m, other=0.0).to(tl.float32)
        out = y * (z / (1.0 + tl.exp(-z)))  # times silu(z) in f32
        tl.store(o_ptr + r * D + offs, out.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_k(g_ptr, u_ptr, o_ptr, NH, D, sg_t, sg_h, su_t, su_h, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        cb = tl.program_id(1)
        t = r // NH
        h = r % NH
        offs = cb * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        g = tl.load(g_ptr + t * sg_t + h * sg_h + offs, mask=m, other=0.0)
        u = tl.load(u_ptr + t * su_t + h * su_h + offs, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # silu rounded, as torch's silu
        tl.store(o_ptr + r * D + offs, (s * u).to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_k(x_ptr, pos_ptr, inv_ptr, o_ptr, NH, D, sx_t, sx_h, factor, HALF: tl.constexpr,
                BLOCK: tl.constexpr):
        r = tl.program_id(0)
        t = r // NH
        h = r % NH
        offs = tl.arange(0, BLOCK)
        m = offs < D
        base = x_ptr + t * sx_t + h * sx_h
        x = tl.load(base + offs, mask=m, other=0.0)
        rot = offs < 2 * HALF
        lo = offs < HALF
        partner = tl.where(lo, offs + HALF, offs - HALF)
        xp = tl.load(base + partner, mask=m & rot, other=0.0).to(tl.float32)
        fi = tl.where(lo, offs, offs - HALF)
        inv = tl.load(inv_ptr + fi, mask=m & rot, other=0.0)
        pos = tl.load(pos_ptr + t).to(tl.float32)
        ang = pos * inv
        # cos/sin rounded to x's type first, as the reference casts its tables
        c = (tl.cos(ang) * factor).to(x.dtype).to(tl.float32)
        s = (tl.sin(ang) * factor).to(x.dtype).to(tl.float32)
        xf = x.to(tl.float32)
        sign = tl.where(lo, -1.0, 1.0)
        out = tl.where(rot, xf * c + sign * xp * s, xf)
        tl.store(o_ptr + r * D + offs, out.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _ssm_conv_k(x_ptr, w_ptr, o_ptr, T, C, K: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        cb = tl.program_id(1)
        offs = cb * BLOCK + tl.arange(0, BLOCK)
        m = offs < C
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            xv = tl.load(x_ptr + (t + j) * C + offs, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + offs * K + j, mask=m, other=0.0).to(tl.float32)
            acc += xv * wv
        y = acc.to(o_ptr.dtype.element_ty).to(tl.float32)  # the conv's output type, then silu
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(o_ptr + t * C + offs, y.to(o_ptr.dtype.element_ty), mask=m)


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """x [..., D] (up to 3 dims, strided rows), w [D] -> contiguous [..., D] in x's type."""
    xs, nt, nh, st, sh = _rows(x)
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with on(out):
        _rms_norm_k[(nt * nh,)](xs, w, out, nh, D, st, sh, float(eps), OFFSET=float(offset), HAS_OFF=bool(offset),
                                BLOCK=_block(D), num_warps=4 if D <= 2048 else 8)
    return out


def rms_norm_gated(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xs, nt, nh, st, sh = _rows(x)
    if z.shape != x.shape:
        z = z.reshape(x.shape)
    zs, _, _, zt, zh = _rows(z)
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with on(out):
        _rms_norm_gated_k[(nt * nh,)](xs, zs, w, out, nh, D, st, sh, zt, zh, float(eps), BLOCK=_block(D), num_warps=4)
    return out


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    gs, nt, nh, gt, gh = _rows(g)
    us, _, _, ut, uh = _rows(u)
    D = g.shape[-1]
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    B = min(1024, _block(D))
    with on(out):
        _swiglu_k[(nt * nh, triton.cdiv(D, B))](gs, us, out, nh, D, gt, gh, ut, uh, BLOCK=B, num_warps=4)
    return out


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, n_rot: int, factor: float) -> torch.Tensor:
    """x [T,h,d], pos [T] int, inv_freq [n_rot/2] f32 on x's device -> [T,h,d]."""
    xs, nt, nh, st, sh = _rows(x)
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with on(out):
        _rope_k[(nt * nh,)](xs, pos, inv_freq, out, nh, D, st, sh, float(factor), HALF=n_rot // 2, BLOCK=_block(D),
                            num_warps=2)
    return out


def ssm_conv(x: torch.Tensor, w: torch.Tensor, silu: bool) -> torch.Tensor:
    """x [K-1+T, C] (state rows first), w [C, K] -> [T, C] in x's type (depthwise causal conv)."""
    x = x if x.is_contiguous() else x.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    C, K = w.shape
    T = x.shape[0] - (K - 1)
    out = torch.empty((T, C), dtype=x.dtype, device=x.device)
    B = 1024
    with on(out):
        _ssm_conv_k[(T, triton.cdiv(C, B))](x, w, out, T, C, K=K, SILU=silu, BLOCK=B, num_warps=4)
    return out
