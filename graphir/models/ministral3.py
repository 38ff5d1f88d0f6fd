"""Ministral 3 / Devstral 2 (transformers `ministral3`, llama.cpp `mistral3`): Llama's layout
with YaRN RoPE (attention factor from mscale / mscale_all_dim) and the Llama-4 query
temperature after RoPE (`attn_temp`, from `llama_4_scaling_beta`); both come from the config
through graphir.models.common.attention."""

from __future__ import annotations

from graphir.models.llama import layer

__all__ = ["layer"]
