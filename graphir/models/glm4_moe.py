"""GLM-4.5 / GLM-4.7 (transformers `glm4_moe`): GQA attention with q/k/v biases, partial RoPE
and an optional per-head Q/K norm; the first `first_k_dense_replace` layers dense, the rest a
sigmoid-routed MoE (selection bias, optional expert groups, routed_scaling_factor) plus an
ungated shared expert. GGUF (llama.cpp `glm4moe`) names the second norm post_attention_norm.
The multi-token-prediction layer of the checkpoints is not part of the decoder (as in
transformers and llama.cpp's forward pass)."""

from __future__ import annotations

from graphir.models.common import Ctx, attention, ffn, moe
from graphir.ops import Op


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm=c.cfg.use_qk_norm, gated=False)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    h = c.norm(p + "post_attention_norm", x)
    f = moe(c, i, h) if c.cfg.is_moe_layer(i) else ffn(c, p, h, c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, f)
