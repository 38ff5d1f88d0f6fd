"""config.json keys of the MoE families whose layouts differ from Qwen's: ERNIE 4.5 and
Hunyuan. Each reader returns ModelConfig fields from the raw dict, the layer count and the
fields read so far (from_hf_dict calls them, and turns their ConfigErrors into one line)."""

from __future__ import annotations

from typing import Any, Callable

from graphir.models.config_keys import ConfigError, _int


def ernie_moe(d: dict[str, Any], n_layer: int, fields: dict[str, Any]) -> dict[str, Any]:
    """ERNIE 4.5 MoE: layer i routes iff start <= i <= end and (i + 1) % interval == 0; the
    moe_num_shared_experts shared experts run as one ungated FFN of that many times the expert
    size; the router's correction bias (moe_statics) chooses experts."""
    start, end = _int(d, "moe_layer_start_index"), _int(d, "moe_layer_end_index")
    end = n_layer - 1 if end == -1 else end
    n_shared = _int(d, "moe_num_shared_experts")
    if n_shared < 0:
        raise ConfigError(f"moe_num_shared_experts={n_shared} must not be negative")
    n_ff = _int(d, "moe_intermediate_size")
    return dict(n_expert=_int(d, ("moe_num_experts", "num_experts")),
                n_expert_used=_int(d, ("moe_k", "num_experts_per_tok")), moe_intermediate_size=n_ff,
                shared_expert_intermediate_size=n_shared * n_ff, shared_expert_gated=False, router_bias=True,
                norm_topk_prob=True, decoder_sparse_step=_int(d, "moe_layer_interval"),
                mlp_only_layers=tuple(i for i in range(n_layer) if not start <= i <= end))


def _same_per_layer(d: dict[str, Any], key: str, n_layer: int) -> int:
    """A Hunyuan count given once or per layer; per-layer values must agree."""
    v = d.get(key)
    if isinstance(v, list):
        vals = {_int({key: x}, key) for x in v}
        if len(v) != n_layer or len(vals) != 1:
            raise ConfigError(f"{key}={v}: graphir needs one value for every layer")
        return vals.pop()
    return _int(d, key)


def hunyuan_moe(d: dict[str, Any], n_layer: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Hunyuan-A13B as transformers' HunYuanMoEV1 runs it: every layer routes (softmax top-k,
    renormalised) and adds one ungated shared MLP; experts and the shared MLP are
    intermediate_size wide. Config keys transformers ignores are refused where they would mean
    another model (CLA, no QK norm, other expert or shared sizes). The fixed NTK alpha of
    `dynamic` RoPE only stretches the base: theta * alpha^(d / (d - 2))."""
    if d.get("use_cla"):
        raise ConfigError("use_cla=true (cross-layer KV sharing) is not supported (nor by transformers or llama.cpp)")
    if d.get("use_qk_norm") is False:
        raise ConfigError("use_qk_norm=false is not supported: transformers' Hunyuan always normalises Q and K")
    n_ff = fields["intermediate_size"]
    for key, want in (("moe_intermediate_size", n_ff), ("num_shared_expert", 1)):
        if key in d and _same_per_layer(d, key, n_layer) != want:
            raise ConfigError(f"{key}={d[key]} is not supported: transformers' Hunyuan uses "
                              f"{'intermediate_size' if want == n_ff else 'one shared MLP'} ({want})")
    out = dict(n_expert=_int(d, ("num_experts", "num_local_experts")),
               n_expert_used=_same_per_layer(d, "moe_topk" if "moe_topk" in d else "num_experts_per_tok", n_layer),
               moe_intermediate_size=n_ff, shared_expert_intermediate_size=n_ff, shared_expert_gated=False,
               norm_topk_prob=True)
    sc = dict(fields["rope_scaling"])
    if sc.get("alpha"):
        hd = fields["head_dim"]
        if hd <= 2:
            raise ConfigError(f"head_dim={hd} is too small for NTK-alpha RoPE (alpha^(d/(d-2)))")
        out.update(rope_theta=fields["rope_theta"] * float(sc["alpha"]) ** (hd / (hd - 2)), rope_scaling=())
    return out


READERS: dict[str, Callable[[dict[str, Any], int, dict[str, Any]], dict[str, Any]]] = {
    "ernie4_5_moe": ernie_moe, "hunyuan_v1_moe": hunyuan_moe,
}
