"""Gemma 4 (text, the dense gemma-4-31b shape): Gemma 3's layer (sliding-window layers, a norm
before and after attention and FFN, GeGLU, embedding rows times sqrt(H), soft-capped logits)
with plain RMSNorm weights (w, not 1 + w); attention unscaled (its per-head Q/K norms set the
scale) and every value head RMS-normed without a weight; the full layers with their own head
size and KV heads, values taken from the key projection (attention_k_eq_v) and proportional
RoPE; each layer's output times a learnt scalar (GGUF layer_output_scale)."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, ffn
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm=True, gated=False)
    x = c.op(Op.ADD, p + "attn_residual", x, c.norm(p + "post_attention_norm", a))  # [T,H]
    f = ffn(c, p, c.norm(p + "ffn_norm", x), c.cfg.intermediate_size)
    x = c.op(Op.ADD, p + "ffn_residual", x, c.norm(p + "post_ffw_norm", f))  # [T,H]
    return c.op(Op.MUL, p + "l_out", x, c.w(p + "layer_output_scale", 1))  # [T,H] * [1]
