"""Hunyuan-A13B (transformers `hunyuan_v1_moe`, llama.cpp `hunyuan-moe`): GQA attention with
per-head RMS norms on Q and K after RoPE, softmax top-k experts in every layer plus one
ungated shared MLP; the NTK-alpha RoPE is folded into the base by the config reader."""

from __future__ import annotations

from graphir.models.common import Ctx, decoder_layer


def layer(c: Ctx, i: int, x: str) -> str:
    return decoder_layer(c, i, x, qk_norm=True)
