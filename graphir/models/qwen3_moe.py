"""Qwen3 MoE: Qwen3 attention; top-k routed experts (dense FFN on mlp_only / off-step layers)."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, ffn, moe
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm=True, gated=False)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    h = c.norm(p + "ffn_norm", x)
    f = moe(c, i, h) if c.cfg.is_moe_layer(i) else ffn(c, p, h, c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, f)
