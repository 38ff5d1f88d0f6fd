"""config.json fields of the sigmoid-routed MoE families (glm4_moe, minimax_m2, deepseek_v3),
DeepSeek-V3's multi-head latent attention and Gemma 4's attention, read with
graphir.models.config_keys' strict readers."""

from __future__ import annotations

from typing import Any

from graphir.models.config_keys import ConfigError, _bool, _get, _int, _real


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


def gemma4(d: dict[str, Any], n_layer: int, rope: dict[str, Any], local_rope: dict[str, Any]) -> dict[str, Any]:
    """Gemma 4's text decoder as its dense releases configure it (gemma-4-31b): sliding and full
    layers, the full ones with their own head size and KV heads and (attention_k_eq_v) values
    from the key projection; proportional RoPE on the full layers. Per-layer inputs, shared KV
    layers and the MoE block (the E2B/E4B/26B-A4B variants) are refused by name."""
    if _get(d, "hidden_size_per_layer_input", default=0):
        raise ConfigError("hidden_size_per_layer_input (Gemma 4's per-layer inputs) is not supported; only 0")
    if _get(d, "num_kv_shared_layers", default=0):
        raise ConfigError("num_kv_shared_layers (Gemma 4's shared KV layers) is not supported; only 0")
    if _get(d, "enable_moe_block", default=False):
        raise ConfigError("enable_moe_block (Gemma 4's MoE block) is not supported")
    if _get(d, "use_bidirectional_attention") == "all":
        raise ConfigError("use_bidirectional_attention='all' is not supported (causal text only)")
    if _get(d, "attention_bias", default=False):
        raise ConfigError("attention_bias=true is not supported for gemma4")
    act = _get(d, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ConfigError(f"hidden_activation {act!r}: Gemma 4 uses gelu_pytorch_tanh")
    if local_rope.get("rope_type", "default") != "default":
        raise ConfigError(f"sliding layers' rope_type {local_rope['rope_type']!r}: only default is supported")
    if rope.get("rope_type", "default") not in ("default", "proportional"):
        raise ConfigError(f"full layers' rope_type {rope['rope_type']!r}: only default and proportional are supported")
    types = d.get("layer_types")
    if types is None:  # Gemma4TextConfig's default: every 6th layer full
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layer)]
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"layer_types must be a list of strings, got {types!r}")
    types = list(types)
    if types:  # transformers forces the last layer to full attention
        types[-1] = "full_attention"
    k_eq_v = _bool(d, "attention_k_eq_v", False)
    glob = _get(d, "num_global_key_value_heads")
    head = _int(d, "global_head_dim")
    kv = _int(d, "num_global_key_value_heads") if k_eq_v and glob is not None else 0  # transformers' gate
    per = d.get("per_layer_config")
    if per is not None:  # what transformers 5.x saves instead: {layer: overrides} for the full layers
        head, kv = _per_layer(per, [i for i, t in enumerate(types) if t == "full_attention"], d)
    if kv == _int(d, "num_key_value_heads"):  # the same KV heads as the sliding layers: nothing of its own
        kv = 0
    return dict(
        sliding_window=_int(d, "sliding_window"), hidden_act="gelu_pytorch_tanh",
        rope_local_theta=_real({"t": _get(local_rope, "rope_theta", default=10000.0)}, "t"),
        final_logit_softcapping=_real({"c": _get(d, "final_logit_softcapping", default=0.0) or 0.0}, "c"),
        layer_types=tuple(types), global_head_dim=head, global_kv_head=kv, k_eq_v=k_eq_v)


def _per_layer(per: Any, full: list[int], d: dict[str, Any]) -> tuple[int, int]:
    """(head_dim, KV heads) of the full layers from per_layer_config (transformers leaves out
    the layers, and the keys, that keep the base values); one size for every full layer is
    what graphir builds."""
    if not isinstance(per, dict) or not all(isinstance(v, dict) for v in per.values()):
        raise ConfigError("per_layer_config must map layers to JSON objects")
    if not {str(k) for k in per} <= {str(i) for i in full}:
        raise ConfigError("per_layer_config must override only the full_attention layers")
    if any(k not in ("head_dim", "num_key_value_heads") for v in per.values() for k in v):
        raise ConfigError("per_layer_config: only head_dim and num_key_value_heads overrides are supported")
    base = (_int(d, "head_dim"), _int(d, "num_key_value_heads"))
    sizes = {(_int(o, "head_dim", base[0]), _int(o, "num_key_value_heads", base[1]))
             for o in (per.get(str(i), per.get(i, {})) for i in full)}  # type: ignore[call-overload]
    if len(sizes) > 1:
        raise ConfigError("per_layer_config: only one head_dim / num_key_value_heads for every full layer is supported")
    return next(iter(sizes), base)
