"""ERNIE 4.5 MoE (Baidu): Llama-style attention (no QK norm) with interleaved RoPE pairs,
which the weight loaders turn into graphir's NeoX halves by permuting Q/K rows per head (the
attention scores do not change); leading dense layers, then softmax-routed experts chosen
with a correction bias (`moe_topk_bias`) plus ungated shared experts."""

from __future__ import annotations

from graphir.models.common import Ctx, decoder_layer


def layer(c: Ctx, i: int, x: str) -> str:
    return decoder_layer(c, i, x, qk_norm=False)
