"""Qwen3 dense: Llama's layout plus per-head RMS norms on Q and K before RoPE."""

from __future__ import annotations

from graphir.models.common import Ctx, decoder_layer


def layer(c: Ctx, i: int, x: str) -> str:
    return decoder_layer(c, i, x, qk_norm=True)
