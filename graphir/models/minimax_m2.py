"""MiniMax-M2 (transformers `minimax_m2`): GQA attention with partial RoPE whose Q/K RMS norm
spans all heads at once (one weight of n_head * head_dim), and a sigmoid-routed MoE with a
selection bias in every layer (no shared expert, no dense layers)."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, moe
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm="all", gated=False)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    return c.op(Op.ADD, p + "l_out", x, moe(c, i, c.norm(p + "ffn_norm", x)))
