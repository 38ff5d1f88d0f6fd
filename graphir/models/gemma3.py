"""Gemma 3 (text): five sliding-window layers (local RoPE base) per full one (global RoPE,
linearly scaled); per-head Q/K norms; a norm before and after both attention and FFN; GeGLU;
embedding rows times sqrt(H); every RMSNorm zero-centred ((1 + w), in f32); attention scaled
by 1/sqrt(query_pre_attn_scalar)."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, ffn
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x, 1.0), qk_norm=True, gated=False, norm_offset=1.0)
    x = c.op(Op.ADD, p + "attn_residual", x, c.norm(p + "post_attention_norm", a, 1.0))  # [T,H]
    f = ffn(c, p, c.norm(p + "ffn_norm", x, 1.0), c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, c.norm(p + "post_ffw_norm", f, 1.0))
