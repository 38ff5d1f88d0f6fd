"""Seed-OSS (ByteDance): Llama's layout with biases on Q, K and V (`attention_bias`) and,
apart from them, on the output projection (`attention_out_bias`, off in Seed-OSS-36B).
llama.cpp names the pre-FFN norm `attn_post_norm` for this architecture (not `ffn_norm`)."""

from __future__ import annotations

from graphir.models.common import Ctx, decoder_layer


def layer(c: Ctx, i: int, x: str) -> str:
    return decoder_layer(c, i, x, qk_norm=False, ffn_norm="attn_post_norm")
