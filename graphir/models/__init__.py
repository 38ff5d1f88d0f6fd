"""Model front ends: `build(cfg, opts)` lowers a ModelConfig to a Graph for one phase."""

from __future__ import annotations

from types import ModuleType

from graphir.graph import Graph
from graphir.models import (deepseek_v3, ernie4_5_moe, gemma3, gemma4, glm4_moe, gpt_oss, hunyuan_v1_moe, llama, minimax_m2, ministral3,
                            qwen3, qwen3_5, qwen3_moe, qwen3_next, seed_oss)
from graphir.models.common import BuildOptions, Ctx, embed, head
from graphir.models.config import ConfigError, ModelConfig, from_hf_dict

ARCHES: dict[str, ModuleType] = {"llama": llama, "qwen3": qwen3, "qwen3_moe": qwen3_moe, "qwen3_next": qwen3_next,
                                 "seed_oss": seed_oss, "ministral3": ministral3,
                                 "ernie4_5_moe": ernie4_5_moe, "hunyuan_v1_moe": hunyuan_v1_moe,
                                 "glm4_moe": glm4_moe, "minimax_m2": minimax_m2, "deepseek_v3": deepseek_v3,
                                 "gpt_oss": gpt_oss, "gemma3": gemma3, "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5,
                                 "gemma4": gemma4}

__all__ = ["ARCHES", "BuildOptions", "ConfigError", "ModelConfig", "build", "from_hf_dict"]


def build(cfg: ModelConfig, opts: BuildOptions | None = None, layers: range | None = None) -> Graph:
    """Lower `cfg` for one phase. `layers` keeps a sub-range (embedding and head stay);
    kept layers keep their original indices, so names match the full model's."""
    opts = opts or BuildOptions()
    c = Ctx(cfg, opts)
    x = embed(c)
    keep = layers if layers is not None else range(cfg.n_layer)
    layer_fn = ARCHES[cfg.arch].layer
    for i in keep:
        if not 0 <= i < cfg.n_layer:
            raise ConfigError(f"layer {i} outside 0..{cfg.n_layer - 1}")
        x = layer_fn(c, i, x)
    head(c, x)
    return c.b.graph(model=cfg.name or cfg.arch, arch=cfg.arch, phase=opts.phase, act=opts.act_dtype,
                     quant=opts.quant.label, kv_type=opts.kv_type, layers=f"{keep.start}:{keep.stop}")
