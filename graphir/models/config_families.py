"""config.json fields of the sigmoid-routed MoE families (glm4_moe, minimax_m2, deepseek_v3) and
DeepSeek-V3's multi-head latent attention, read with graphir.models.config's strict readers."""

from __future__ import annotations

from typing import Any

from graphir.models.config_keys import ConfigError, _bool, _int, _real


def sigmoid_moe(d: dict[str, Any], arch: str, n_layer: int) -> dict[str, Any]:
    """MoE fields of the sigmoid-routed families. GLM-4.5 names its experts n_routed_experts,
    sizes its shared expert as n_shared_experts x moe_intermediate_size and keeps the first
    first_k_dense_replace layers dense; MiniMax-M2's experts are intermediate_size wide."""
    func = d.get("scoring_func", "sigmoid")
    if func != "sigmoid":
        raise ConfigError(f"scoring_func={func!r}: {arch} is supported with sigmoid routing only")
    if arch == "minimax_m2":
        if d.get("use_routing_bias") is False:
            raise ConfigError("use_routing_bias=false is not supported for minimax_m2")
        return dict(n_expert=_int(d, ("num_experts", "num_local_experts")),
                    n_expert_used=_int(d, "num_experts_per_tok"),
                    moe_intermediate_size=_int(d, "intermediate_size"), norm_topk_prob=True, router_bias=True)
    N = _int(d, "moe_intermediate_size")
    dense = _int(d, "first_k_dense_replace")
    if not 0 <= dense <= n_layer:
        raise ConfigError(f"first_k_dense_replace={dense} must be in 0..num_hidden_layers={n_layer}")
    return dict(n_expert=_int(d, ("n_routed_experts", "num_local_experts")),
                n_expert_used=_int(d, "num_experts_per_tok"),
                moe_intermediate_size=N, shared_expert_intermediate_size=N * _int(d, "n_shared_experts"),
                norm_topk_prob=_bool(d, "norm_topk_prob", True), mlp_only_layers=tuple(range(dense)),
                routed_scaling_factor=_real(d, "routed_scaling_factor", 1.0), n_group=_int(d, "n_group", 1),
                topk_group=_int(d, "topk_group", 1), use_qk_norm=_bool(d, "use_qk_norm", False),
                # the shared expert is added without a gate; GLM biases q, k and v but not the output
                router_bias=True, shared_expert_gated=False,
                **({"attention_out_bias": False} if arch == "glm4_moe" else {}))


def mla(d: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3's attention sizes. Every head has its own keys (num_key_value_heads says the
    same); head_dim is the rotary part, as transformers sets it."""
    q = d.get("q_lora_rank")
    return dict(head_dim=_int(d, "qk_rope_head_dim"), n_kv_head=_int(d, "num_attention_heads"),
                q_lora_rank=0 if q is None else _int(d, "q_lora_rank"), kv_lora_rank=_int(d, "kv_lora_rank"),
                qk_nope_head_dim=_int(d, "qk_nope_head_dim"), v_head_dim=_int(d, "v_head_dim"),
                rope_interleave=_bool(d, "rope_interleave", True))
