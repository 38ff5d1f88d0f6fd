"""Qwen3 MoE: Qwen3 attention; top-k routed experts (dense FFN on mlp_only / off-step layers)."""

from __future__ import annotations

from graphir.models.common import Ctx, decoder_layer


def layer(c: Ctx, i: int, x: str) -> str:
    return decoder_layer(c, i, x, qk_norm=True)
