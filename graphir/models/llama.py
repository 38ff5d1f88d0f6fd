"""Llama 2/3 and Mistral-style decoders: GQA attention (optional bias), SwiGLU FFN."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, ffn
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm=False, gated=False)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    f = ffn(c, p, c.norm(p + "ffn_norm", x), c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, f)
