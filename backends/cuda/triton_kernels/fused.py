"""Fused Triton kernels for the small ops of the CUDA rule table (one launch each).

On a GPU a decode step is a few hundred tiny kernels; in the reference table an RMS norm is
seven torch launches, RoPE about fifteen. Each kernel here does one op in one launch with the
reference table's rounding points (values rounded to the activation type where torch rounds
them), so results agree with reference/kernels.py to the last bit or two.

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


def usable_device(dev: str) -> bool:
    """Whether Triton can run on a device named like "cuda:0" / "cpu" (see usable)."""
    return triton is not None and (dev.startswith("cuda") or INTERPRET)


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
    def _rms_norm_k(x_ptr, w_ptr, o_ptr, NR, NH, D, sx_t, sx_h, eps, OFFSET: tl.constexpr, HAS_OFF: tl.constexpr,
                    R: tl.constexpr, BLOCK: tl.constexpr):
        # R rows per program: a prefill's per-head norms are tens of thousands of 128-wide rows
        r = tl.program_id(0) * R + tl.arange(0, R)
        mr = r < NR
        t = r // NH
        h = r % NH
        offs = tl.arange(0, BLOCK)
        m = mr[:, None] & (offs < D)[None, :]
        x = tl.load(x_ptr + (t * sx_t + h * sx_h)[:, None] + offs[None, :], mask=m, other=0.0)
        xf = x.to(tl.float32)
        y = xf * tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :]
        if HAS_OFF:
            out = y * (OFFSET + w)  # Qwen3NextRMSNorm: (1 + w) in f32, then cast
        else:
            out = y.to(x.dtype).to(tl.float32) * w  # LlamaRMSNorm: cast, then times w in x's type
        tl.store(o_ptr + r[:, None] * D + offs[None, :], out.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rms_norm_gated_k(x_ptr, z_ptr, w_ptr, o_ptr, NR, NH, D, sx_t, sx_h, sz_t, sz_h, eps, R: tl.constexpr,
                          BLOCK: tl.constexpr, ROUND: tl.constexpr):
        r = tl.program_id(0) * R + tl.arange(0, R)
        mr = r < NR
        t = r // NH
        h = r % NH
        offs = tl.arange(0, BLOCK)
        m = mr[:, None] & (offs < D)[None, :]
        x = tl.load(x_ptr + (t * sx_t + h * sx_h)[:, None] + offs[None, :], mask=m, other=0.0)
        if ROUND:  # x comes wider than the output (a cast folded in): round it to the output type first
            x = x.to(o_ptr.dtype.element_ty)
        xf = x.to(tl.float32)
        y = (xf * tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :]
        y = (w * y).to(x.dtype).to(tl.float32)  # w * norm(x) in x's type
        z = tl.load(z_ptr + (t * sz_t + h * sz_h)[:, None] + offs[None, :], mask=m, other=0.0).to(tl.float32)
        out = y * (z / (1.0 + tl.exp(-z)))  # times silu(z) in f32
        tl.store(o_ptr + r[:, None] * D + offs[None, :], out.to(o_ptr.dtype.element_ty), mask=m)

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
    def _ssm_conv_k(x_ptr, w_ptr, o_ptr, T, C, K: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr,
                    BLOCK: tl.constexpr):
        # BT tokens per program, K <= 4: the taps are loaded once and the last K-1 input rows
        # roll along in registers, so each input row is read from memory once per program
        tb = tl.program_id(0)
        cb = tl.program_id(1)
        offs = cb * BLOCK + tl.arange(0, BLOCK)
        m = offs < C
        t0 = tb * BT
        # taps, and rows t0 .. t0+K-2 of x (K-1 state rows come first): the window before the
        # first output; taps past K stay zero
        w0 = tl.load(w_ptr + offs * K, mask=m, other=0.0).to(tl.float32)
        w1 = tl.zeros([BLOCK], dtype=tl.float32)
        w2 = tl.zeros([BLOCK], dtype=tl.float32)
        w3 = tl.zeros([BLOCK], dtype=tl.float32)
        x0 = tl.zeros([BLOCK], dtype=tl.float32)
        x1 = tl.zeros([BLOCK], dtype=tl.float32)
        x2 = tl.zeros([BLOCK], dtype=tl.float32)
        if K > 1:
            w1 = tl.load(w_ptr + offs * K + 1, mask=m, other=0.0).to(tl.float32)
            x0 = tl.load(x_ptr + t0 * C + offs, mask=m, other=0.0).to(tl.float32)
        if K > 2:
            w2 = tl.load(w_ptr + offs * K + 2, mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(x_ptr + (t0 + 1) * C + offs, mask=m, other=0.0).to(tl.float32)
        if K > 3:
            w3 = tl.load(w_ptr + offs * K + 3, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + (t0 + 2) * C + offs, mask=m, other=0.0).to(tl.float32)
        for i in range(0, BT):
            t = t0 + i
            mt = m & ((offs * 0 + t) < T)  # a vector mask: the last block may end before BT tokens
            xn = tl.load(x_ptr + (t + K - 1) * C + offs, mask=mt, other=0.0).to(tl.float32)
            if K == 4:
                acc = x0 * w0 + x1 * w1 + x2 * w2 + xn * w3
                x0, x1, x2 = x1, x2, xn
            elif K == 3:
                acc = x0 * w0 + x1 * w1 + xn * w2
                x0, x1 = x1, xn
            elif K == 2:
                acc = x0 * w0 + xn * w1
                x0 = xn
            else:
                acc = xn * w0
            y = acc.to(o_ptr.dtype.element_ty).to(tl.float32)  # the conv's output type, then silu
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(o_ptr + t * C + offs, y.to(o_ptr.dtype.element_ty), mask=mt)


    @triton.jit
    def _add_rms_norm_k(a_ptr, b_ptr, w_ptr, s_ptr, o_ptr, D, eps, OFFSET: tl.constexpr, HAS_OFF: tl.constexpr,
                        BLOCK: tl.constexpr):
        # a residual add and the norm that reads it: the sum rounded as torch's add rounds it,
        # written out (the next residual reads it), then normalised as _rms_norm_k does
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        a = tl.load(a_ptr + r * D + offs, mask=m, other=0.0)
        x = (a.to(tl.float32) + tl.load(b_ptr + r * D + offs, mask=m, other=0.0).to(tl.float32)).to(a.dtype)
        tl.store(s_ptr + r * D + offs, x, mask=m)
        tl.store(o_ptr + r * D + offs, norm_row(x, w_ptr, offs, m, D, eps, OFFSET, HAS_OFF).to(o_ptr.dtype.element_ty),
                 mask=m)

    @triton.jit
    def norm_row(x, w_ptr, offs, m, D, eps, OFFSET: tl.constexpr, HAS_OFF: tl.constexpr):
        # one row's rms_norm in f32, rounded where _rms_norm_k rounds (kernels that make the
        # row themselves call this: the add+norm ones)
        xf = x.to(tl.float32)
        y = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_OFF:
            return y * (OFFSET + w)
        return y.to(x.dtype).to(tl.float32) * w

    @triton.jit
    def _conv_step_k(s_ptr, x_ptr, w_ptr, o_ptr, C, K: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
        # one token: out = conv over [state rows, x]; the state then shifts up one row and takes
        # x, in place (each program owns its channels in every row: read all, then write)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < C
        xn = tl.load(x_ptr + offs, mask=m, other=0.0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K - 1):  # oldest tap first, as _ssm_conv_k sums
            r = tl.load(s_ptr + j * C + offs, mask=m, other=0.0)
            acc += r.to(tl.float32) * tl.load(w_ptr + offs * K + j, mask=m, other=0.0).to(tl.float32)
            if j > 0:
                tl.store(s_ptr + (j - 1) * C + offs, r, mask=m)
        acc += xn.to(tl.float32) * tl.load(w_ptr + offs * K + (K - 1), mask=m, other=0.0).to(tl.float32)
        tl.store(s_ptr + (K - 2) * C + offs, xn.to(s_ptr.dtype.element_ty), mask=m)
        y = acc.to(o_ptr.dtype.element_ty).to(tl.float32)  # the conv's output type, then silu
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(o_ptr + offs, y.to(o_ptr.dtype.element_ty), mask=m)


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _rows_per_program(n: int, d: int) -> int:
    """Several short rows per program once there are thousands of them (a prefill's heads);
    one row per program for a decode step, where latency, not bandwidth, decides."""
    if n < 1024:
        return 1
    return max(1, min(16, 2048 // _block(d)))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """x [..., D] (up to 3 dims, strided rows), w [D] -> contiguous [..., D] in x's type."""
    xs, nt, nh, st, sh = _rows(x)
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n, R = nt * nh, _rows_per_program(nt * nh, D)
    with on(out):
        _rms_norm_k[(triton.cdiv(n, R),)](xs, w, out, n, nh, D, st, sh, float(eps), OFFSET=float(offset),
                                          HAS_OFF=bool(offset), R=R, BLOCK=_block(D),
                                          num_warps=4 if D <= 2048 else 8)
    return out


def rms_norm_gated(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dtype`: the output type when x is wider (f32 x, bf16 out): x is rounded to it first,
    the value of rms_norm_gated(cast(x, dtype), z, w)."""
    xs, nt, nh, st, sh = _rows(x)
    if z.shape != x.shape:
        z = z.reshape(x.shape)
    zs, _, _, zt, zh = _rows(z)
    D = x.shape[-1]
    dt = dtype or x.dtype
    out = torch.empty(x.shape, dtype=dt, device=x.device)
    n, R = nt * nh, _rows_per_program(nt * nh, D)
    with on(out):
        _rms_norm_gated_k[(triton.cdiv(n, R),)](xs, zs, w, out, n, nh, D, st, sh, zt, zh, float(eps), R=R,
                                                BLOCK=_block(D), ROUND=dt != x.dtype, num_warps=4)
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
    if K > 4:  # the kernel keeps at most four taps in registers
        raise ValueError(f"conv kernel of {K} taps: the Triton kernel handles up to 4")
    B, BT = 1024, (1 if T < 64 else 32)
    with on(out):
        _ssm_conv_k[(triton.cdiv(T, BT), triton.cdiv(C, B))](x, w, out, T, C, K=K, SILU=silu, BT=BT, BLOCK=B,
                                                              num_warps=4)
    return out


def conv_step(state: torch.Tensor, x: torch.Tensor, w: torch.Tensor, silu: bool) -> torch.Tensor:
    """One decode token of the causal conv with its state kept in place: state [K-1, C]
    (contiguous, updated: shifted one row, x appended), x [1, C], w [C, K] -> [1, C] in x's
    type; the same values as ssm_conv(concat(state, x), w)."""
    C, K = w.shape
    if (K < 2 or K > 4 or state.shape != (K - 1, C) or not state.is_contiguous() or x.shape != (1, C)
            or not state.dtype == x.dtype == w.dtype):
        raise ValueError(f"conv step wants state [{K - 1},{C}] contiguous, x [1,{C}], one type, K in 2..4")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    out = torch.empty((1, C), dtype=x.dtype, device=x.device)
    B = 1024
    with on(out):
        _conv_step_k[(triton.cdiv(C, B),)](state, x, w, out, C, K=K, SILU=silu, BLOCK=B, num_warps=4)
    return out



def add_rms_norm(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float, offset: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a + b, rms_norm(a + b)) for rows [T, D] of one type in one launch: a decode step's
    residual add and the norm after it (the values of torch's add, then `rms_norm`)."""
    if a.shape != b.shape or a.dim() != 2 or a.dtype != b.dtype or w.shape != (a.shape[1],):
        raise ValueError(f"add_rms_norm wants two [T, D] rows of one type and w [D], got {list(a.shape)}, "
                         f"{list(b.shape)}, {list(w.shape)}")
    a, b = (x if x.is_contiguous() else x.contiguous() for x in (a, b))
    T, D = a.shape
    s = torch.empty_like(a)
    out = torch.empty_like(a)
    with on(out):
        _add_rms_norm_k[(T,)](a, b, w, s, out, D, float(eps), OFFSET=float(offset), HAS_OFF=bool(offset),
                              BLOCK=_block(D), num_warps=4 if D <= 2048 else 8)
    return s, out
