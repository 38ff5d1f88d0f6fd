"""Qwen3-Next: gated delta-net layers and gated full attention, MoE with a shared expert.

Norms are zero-centred (weight + 1) except the delta-net's gated output norm. The delta-net
follows transformers' layout: the qkvz projection is grouped per key head as
[q(dk) | k(dk) | v(r*dv) | z(r*dv)] with r = value heads per key head, and ba as [b(r) | a(r)].
"""

from __future__ import annotations

from typing import Callable

from graphir.dtypes import F32
from graphir.models.common import Ctx, attention, ffn, moe
from graphir.ops import Op


def delta_net(c: Ctx, i: int, x: str) -> str:
    """Gated delta-net: x [T,H] normed -> [T,H]; threads conv and recurrent state."""
    cfg, p, T = c.cfg, f"blk.{i}.", c.T
    H, nk, nv = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = nv // nk
    group = 2 * dk + 2 * r * dv
    qkvz = c.view(p + "qkvz_heads", c.op(Op.MATMUL, p + "ssm_in", x, c.w(p + "ssm_in", nk * group, H)),
                  T, nk, group)  # [T,nk,group]
    q = c.view(p + "ssm_q", c.cut(p + "ssm_q_heads", qkvz, 2, 0, dk), T, nk * dk)
    k = c.view(p + "ssm_k", c.cut(p + "ssm_k_heads", qkvz, 2, dk, 2 * dk), T, nk * dk)
    v = c.view(p + "ssm_v", c.cut(p + "ssm_v_heads", qkvz, 2, 2 * dk, 2 * dk + r * dv), T, nv * dv)
    z = c.view(p + "ssm_z", c.cut(p + "ssm_z_heads", qkvz, 2, 2 * dk + r * dv, group), T, nv, dv)
    ba = c.view(p + "ba_heads", c.op(Op.MATMUL, p + "ssm_ba", x, c.w(p + "ssm_ba", nk * 2 * r, H)), T, nk, 2 * r)
    b = c.view(p + "ssm_b", c.cut(p + "ssm_b_heads", ba, 2, 0, r), T, nv)  # [T,nv]
    a = c.view(p + "ssm_alpha", c.cut(p + "ssm_a_heads", ba, 2, r, 2 * r), T, nv)
    mixed = c.op(Op.CONCAT, p + "conv_x", q, k, v, dim=1)  # [T,C]
    return delta_core(c, i, mixed, z, b, a)


def delta_core(c: Ctx, i: int, mixed: str, z: str, b: str, a: str) -> str:
    """The delta-net after its input projections: mixed [T,C] = [q | k | v] (all heads), z
    [T,nv,dv] the output gate, b and a [T,nv] the beta and decay logits -> [T,H]."""
    cfg, p, T = c.cfg, f"blk.{i}.", c.T
    H, nk, nv = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    C = cfg.conv_dim
    conv_state = c.state(p + "conv_state", (K - 1, C), c.act)
    conv_in = c.op(Op.CONCAT, p + "conv_in", conv_state, mixed, dim=0)  # [K-1+T,C]
    c.result(p + "conv_state", c.cut(p + "conv_state.next", conv_in, 0, T, f"T+{K - 1}" if T == "T" else T + K - 1))
    conv = c.op(Op.SSM_CONV, p + "ssm_conv", conv_in, c.w(p + "ssm_conv1d", C, K), act="silu")  # [T,C]
    cq = c.view(p + "conv_q", c.cut(p + "conv_q_flat", conv, 1, 0, nk * dk), T, nk, dk)
    ck = c.view(p + "conv_k", c.cut(p + "conv_k_flat", conv, 1, nk * dk, 2 * nk * dk), T, nk, dk)
    cv = c.view(p + "conv_v", c.cut(p + "conv_v_flat", conv, 1, 2 * nk * dk, C), T, nv, dv)
    beta = c.op(Op.SIGMOID, p + "ssm_beta", b)
    # g = -exp(A_log) * softplus(a + dt_bias); ssm_a holds -exp(A_log) as in GGUF files
    if c.act != F32:  # the decay is computed in f32 (as transformers does): exp() of it compounds over T
        a = c.op(Op.CAST, p + "ssm_alpha_f32", a, dtype="f32")
    sp = c.op(Op.SOFTPLUS, p + "ssm_dt_sp", c.op(Op.ADD, p + "ssm_dt_add", a, c.w(p + "ssm_dt.bias", nv)))
    g = c.op(Op.MUL, p + "ssm_g", sp, c.w(p + "ssm_a", nv))  # [T,nv]
    state = c.state(p + "ssm_state", (dk, nv, dv), F32)
    dn = c.op(Op.DELTA_NET, p + "delta_net", cq, ck, cv, g, beta, state, qk_l2norm=True)  # [T+dk,nv,dv]
    c.result(p + "ssm_state", c.cut(p + "ssm_state.next", dn, 0, T, f"T+{dk}" if T == "T" else T + dk))
    o = c.cut(p + "delta_out", dn, 0, 0, T)  # [T,nv,dv] f32
    if c.act != F32:
        o = c.op(Op.CAST, p + "delta_out_cast", o, dtype=c.act.name)
    o = c.op(Op.RMS_NORM_GATED, p + "ssm_norm", o, z, c.w(p + "ssm_norm", dv), eps=cfg.rms_norm_eps)
    o = c.view(p + "ssm_norm_flat", o, T, nv * dv)
    return c.op(Op.MATMUL, p + "ssm_out", o, c.w(p + "ssm_out", H, nv * dv))


def layer(c: Ctx, i: int, x: str, mixer: Callable[[Ctx, int, str], str] = delta_net) -> str:
    """One hybrid layer; `mixer` builds the delta-net (Qwen3.5 projects its inputs apart)."""
    p = f"blk.{i}."
    h = c.norm(p + "attn_norm", x, 1.0)
    if c.cfg.is_recurrent(i):
        a = mixer(c, i, h)
    else:
        a = attention(c, i, h, qk_norm=True, gated=True, norm_offset=1.0)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    h = c.norm(p + "post_attention_norm", x, 1.0)
    f = moe(c, i, h) if c.cfg.is_moe_layer(i) else ffn(c, p, h, c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, f)
