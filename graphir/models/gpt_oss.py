"""gpt-oss: GQA attention with biases and per-head sinks, sliding-window layers alternating
with full ones; a biased router and biased experts with the clamped SwiGLU; RMSNorm
(weight times the normalised x); YaRN RoPE."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, moe
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm=False, gated=False, sinks=True)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    f = moe(c, i, c.norm(p + "post_attention_norm", x), biased=True)
    return c.op(Op.ADD, p + "l_out", x, f)
