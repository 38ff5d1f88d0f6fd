"""Parameter counts: graphir's (read off the built graph) and transformers' (a model built on
the meta device, persistent buffers included: they are checkpoint tensors too)."""

from __future__ import annotations

from graphir.models import BuildOptions, build, from_hf_dict
from graphir.stats import graph_stats
from helpers.hf_oracle import hf_checkpoint_numel

def hf_params(d: dict) -> int:
    # persistent buffers are checkpoint tensors too (sigmoid routers' e_score_correction_bias)
    return hf_checkpoint_numel(d)


def graphir_params(d: dict, phase: str = "tg") -> int:
    return graph_stats(build(from_hf_dict(d), BuildOptions(phase=phase))).params_total
