"""Qwen3 dense: Llama's layout plus per-head RMS norms on Q and K before RoPE."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, ffn
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm=True, gated=False)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    f = ffn(c, p, c.norm(p + "ffn_norm", x), c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, f)
