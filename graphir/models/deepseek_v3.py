"""DeepSeek-V3 / R1 and Kimi-K2 (transformers `deepseek_v3`): multi-head latent attention and
GLM-style sigmoid-routed MoE (group-limited top-k, shared experts, dense first layers).

Attention is built in its absorbed form, for prefill and decode alike: the cache holds one
latent row per token, [normed kv_lora_rank | roped qk_rope_head_dim], shared by every head (an
MQA of one KV head). Each head's nope query is taken into the latent space by its slice of
kv_b (attn_k_b [heads, kv_lora_rank, nope]), attends over the latent rows (values = their first
kv_lora_rank columns), and the result leaves through attn_v_b [heads, v_head_dim, kv_lora_rank].
This is transformers' expand-then-attend product reassociated, so the logits agree to rounding.
Checkpoints keep the rotary dims as interleaved pairs; the loader de-interleaves those weight
rows, so the graph's `rope` (rotate-half on the first n_rot dims) rotates the same pairs.
"""

from __future__ import annotations

import math

from graphir.models.common import Ctx, ffn, moe, rope_attrs
from graphir.ops import Op


def _mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 or not m else 0.1 * m * math.log(factor) + 1.0


def scale_and_rope(c: Ctx) -> tuple[float, dict[str, object]]:
    """Softmax scale (times mscale^2 under YaRN with mscale_all_dim) and the rope attributes
    (YaRN's cos/sin factor mscale / mscale_all_dim, as transformers computes it)."""
    cfg = c.cfg
    sc, ra = dict(cfg.rope_scaling), rope_attrs(cfg)
    scale = (cfg.qk_nope_head_dim + cfg.head_dim) ** -0.5
    if ra.get("scaling") == "yarn" and "mscale_all_dim" in sc:
        f = float(sc.get("factor", 1.0))
        scale *= _mscale(f, float(sc["mscale_all_dim"])) ** 2
        ra["attn_factor"] = _mscale(f, float(sc.get("mscale", 1.0))) / _mscale(f, float(sc["mscale_all_dim"]))
    return scale, ra


def mla(c: Ctx, i: int, x: str) -> str:
    """x [T,H] normed -> [T,H] (before the residual)."""
    cfg, p, T = c.cfg, f"blk.{i}.", c.T
    H, nh, dn, dr = cfg.hidden_size, cfg.n_head, cfg.qk_nope_head_dim, cfg.head_dim
    dv, r = cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        qa = c.op(Op.MATMUL, p + "attn_q_a", x, c.w(p + "attn_q_a", cfg.q_lora_rank, H))
        qa = c.norm(p + "attn_q_a_norm", qa)
        q = c.op(Op.MATMUL, p + "attn_q_b", qa, c.w(p + "attn_q_b", nh * (dn + dr), cfg.q_lora_rank))
    else:
        q = c.op(Op.MATMUL, p + "attn_q", x, c.w(p + "attn_q", nh * (dn + dr), H))
    q = c.view(p + "q_heads", q, T, nh, dn + dr)  # [T,nh,dn+dr]
    scale, ra = scale_and_rope(c)
    q_pe = c.op(Op.ROPE, p + "q_rope", c.cut(p + "q_pe", q, 2, dn, dn + dr), "positions", **ra)
    q_lat = c.op(Op.HEAD_MATMUL, p + "q_absorbed", c.cut(p + "q_nope", q, 2, 0, dn), c.w(p + "attn_k_b", nh, r, dn))
    kv = c.op(Op.MATMUL, p + "attn_kv_a_mqa", x, c.w(p + "attn_kv_a_mqa", r + dr, H))  # [T,r+dr]
    lat = c.view(p + "kv_lat", c.norm(p + "attn_kv_a_norm", c.cut(p + "kv_cmpr", kv, 1, 0, r)), T, 1, r)
    k_pe = c.view(p + "k_pe", c.cut(p + "kv_pe", kv, 1, r, r + dr), T, 1, dr)  # [T,1,dr]
    k_pe = c.op(Op.ROPE, p + "k_rope", k_pe, "positions", **ra)
    cache = c.state(p + "cache_kv", ("KV", 1, r + dr), c.opts.kv_type)
    row = c.op(Op.CONCAT, p + "kv_row", lat, k_pe, dim=2)  # [T,1,r+dr]
    rows = c.op(Op.KV_APPEND, p + "cache_kv.next", cache, row)  # [KV+T,1,r+dr]
    c.result(p + "cache_kv", rows)
    qf = c.op(Op.CONCAT, p + "q_full", q_lat, q_pe, dim=2)  # [T,nh,r+dr]
    o = c.op(Op.ATTENTION, p + "kqv", qf, rows, c.cut(p + "kv_vals", rows, 2, 0, r), scale=scale)  # [T,nh,r]
    o = c.op(Op.HEAD_MATMUL, p + "kqv_out", o, c.w(p + "attn_v_b", nh, dv, r))  # [T,nh,dv]
    return c.op(Op.MATMUL, p + "attn_output", c.view(p + "kqv_flat", o, T, nh * dv), c.w(p + "attn_output", H, nh * dv))


def layer(c: Ctx, i: int, x: str) -> str:
    p = f"blk.{i}."
    x = c.op(Op.ADD, p + "attn_residual", x, mla(c, i, c.norm(p + "attn_norm", x)))  # [T,H]
    h = c.norm(p + "ffn_norm", x)
    f = moe(c, i, h) if c.cfg.is_moe_layer(i) else ffn(c, p, h, c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, f)
