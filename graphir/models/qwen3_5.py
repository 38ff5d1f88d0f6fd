"""Qwen3.5 (dense `qwen3_5`, MoE `qwen3_5_moe`): the text tower of Qwen3.5's vision-language model.

The layer is Qwen3-Next's (graphir.models.qwen3_next: zero-centred norms, gated attention with
per-head Q/K norms and partial RoPE, a dense SwiGLU FFN or the routed experts with a
sigmoid-gated shared expert) with one difference in the delta-net: its inputs come from four
separate projections instead of Qwen3-Next's two per-key-head grouped ones.

    attn_qkv  [2·nk·dk + nv·dv, H]  rows [q (all heads) | k | v]: the conv input as is
    attn_gate [nv·dv, H]            the output gate z
    ssm_beta  [nv, H], ssm_alpha [nv, H]

GGUF names are llama.cpp's (`qwen35` / `qwen35moe`). Value heads are kept in transformers'
order (head h reads key head h // r); llama.cpp's converter stores them tiled (h reads h % nk),
which the GGUF reader and writer translate. Multimodal RoPE reduces to plain RoPE for text (all
position streams equal the token index), so attention is Qwen3-Next's unchanged.
"""

from __future__ import annotations

from graphir.models import qwen3_next
from graphir.models.common import Ctx
from graphir.ops import Op


def delta_net(c: Ctx, i: int, x: str) -> str:
    """x [T,H] normed -> [T,H]."""
    cfg, p, T = c.cfg, f"blk.{i}.", c.T
    H, nv, dv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_head_dim

    def proj(name: str, weight: str, rows: int) -> str:
        return c.op(Op.MATMUL, p + name, x, c.w(p + weight, rows, H))  # [T,rows]

    mixed = proj("attn_qkv", "attn_qkv", cfg.conv_dim)  # [T,C]
    z = c.view(p + "ssm_z", proj("attn_gate", "attn_gate", nv * dv), T, nv, dv)  # [T,nv,dv]
    # the projections take the names Qwen3-Next gives the same values (ssm_beta is their sigmoid)
    b, a = proj("ssm_b", "ssm_beta", nv), proj("ssm_alpha", "ssm_alpha", nv)  # [T,nv]
    return qwen3_next.delta_core(c, i, mixed, z, b, a)


def layer(c: Ctx, i: int, x: str) -> str:
    return qwen3_next.layer(c, i, x, mixer=delta_net)
