"""Llama 2/3 and Mistral-style decoders: GQA attention (optional bias), SwiGLU FFN."""

from __future__ import annotations

from graphir.models.common import Ctx, decoder_layer


def layer(c: Ctx, i: int, x: str) -> str:
    return decoder_layer(c, i, x, qk_norm=False)
