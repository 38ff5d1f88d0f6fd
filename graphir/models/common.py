"""Blocks shared by the architecture builders: embedding, attention, FFN, MoE, output head.

Shape comments use T = tokens in this micro-batch, KV = tokens already cached, H = hidden.
Weights are [out, in] (torch's layout); names follow GGUF (`blk.{i}.attn_q.weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from graphir.builder import Builder
from graphir.dtypes import DType, F32, I32, dtype, kv_dtype
from graphir.models.config import ModelConfig
from graphir.ops import Op
from graphir.quant import QuantScheme, uniform
from graphir.spec import TensorSpec

Phase = Literal["pp", "tg"]
BARE = ("ssm_a",)  # GGUF tensor names that carry no .weight suffix


@dataclass(frozen=True)
class BuildOptions:
    phase: Phase = "pp"
    act_dtype: str = "f32"  # activations and the compute type of kernels
    quant: QuantScheme = field(default_factory=lambda: uniform("bf16"))
    kv_type: str = "f16"
    logits: Literal["all", "last"] = "all"  # llama.cpp's PP only needs the last row

    def __post_init__(self) -> None:
        kv_dtype(self.kv_type)  # a cache type ik_llama.cpp's -ctk would refuse is refused here, by name


class Ctx:
    """What a builder function needs: the config, options and the node builder."""

    def __init__(self, cfg: ModelConfig, opts: BuildOptions) -> None:
        self.cfg, self.opts, self.b = cfg, opts, Builder()
        self.act: DType = dtype(opts.act_dtype)
        self.T = "T" if opts.phase == "pp" else 1

    def w(self, name: str, *shape: int) -> str:
        """A weight leaf; its storage type comes from the quant scheme."""
        # GGUF stores a few parameters without a suffix (ssm_a); keep its exact names
        full = name if name.endswith((".weight", ".bias")) or name.endswith(BARE) else name + ".weight"
        dt = self.opts.quant(full, shape, self.cfg.n_layer)
        return self.b.leaf(Op.WEIGHT, full, TensorSpec(shape, dt))

    def op(self, op: Op, name: str, *inputs: str, **attrs: object) -> str:
        return self.b.emit(op, name, *inputs, **attrs)

    def view(self, name: str, x: str, *shape: object) -> str:
        return self.b.emit(Op.RESHAPE, name, x, shape=tuple(shape))

    def cut(self, name: str, x: str, axis: int, start: object, stop: object) -> str:
        return self.b.emit(Op.SLICE, name, x, dim=axis, start=start, stop=stop)

    def state(self, name: str, shape: tuple[object, ...], dt: DType | str) -> str:
        return self.b.leaf(Op.STATE_IN, name, TensorSpec(shape, dt), state=name)

    def result(self, key: str, x: str) -> str:
        return self.b.emit(Op.OUTPUT, f"{key}.out", x, key=key)

    def norm(self, name: str, x: str, offset: float = 0.0) -> str:
        w = self.w(name, self.b.spec(x).shape[-1])
        return self.op(Op.RMS_NORM, name, x, w, eps=self.cfg.rms_norm_eps, offset=offset or None)


def embed(c: Ctx) -> str:
    cfg = c.cfg
    c.b.leaf(Op.INPUT, "tokens", TensorSpec((c.T,), I32), role="tokens")
    c.b.leaf(Op.INPUT, "positions", TensorSpec((c.T,), I32), role="positions")
    table = c.w("token_embd", cfg.vocab_size, cfg.hidden_size)
    # Gemma scales the rows by sqrt(H) (in the table's type, as transformers does)
    return c.op(Op.GET_ROWS, "inp_embd", table, "tokens", dtype=c.act.name, scale=cfg.embed_scale)  # [T,H]


def rope_attrs(cfg: ModelConfig, layer: int | None = None) -> dict[str, object]:
    if layer is not None and cfg.rope_local_theta and cfg.window(layer):  # Gemma 3's local RoPE: unscaled
        return {"n_rot": cfg.n_rot, "theta": cfg.rope_local_theta}
    attrs: dict[str, object] = {"n_rot": cfg.n_rot, "theta": cfg.rope_theta}
    if cfg.global_head_dim and layer is not None:  # Gemma 4's full layers turn their whole (own-size) head
        attrs["n_rot"] = cfg.head_size(layer)
    sc = dict(cfg.rope_scaling)
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "proportional" and layer is not None:
        # Gemma 4's full layers: NeoX pairs over the whole head, frequencies theta^(-2j/d) on the
        # first share of the pairs, the other pairs unturned
        d = cfg.head_size(layer)
        attrs.update(n_rot=d, rot_pairs=int(float(sc.get("partial_rotary_factor", 1.0)) * d // 2))
    if kind:
        attrs["scaling"] = str(kind)
        for src, dst in (("factor", "factor"), ("low_freq_factor", "low_freq_factor"),
                         ("high_freq_factor", "high_freq_factor"), ("original_max_position_embeddings", "original_ctx"),
                         ("attention_factor", "attn_factor"), ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if sc.get(src) is not None:
                attrs[dst] = float(sc[src]) if dst != "original_ctx" else int(sc[src])
        ms, ms_all = sc.get("mscale"), sc.get("mscale_all_dim")
        if kind == "yarn" and "attn_factor" not in attrs and ms and ms_all:
            # transformers' YaRN: get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            f = float(sc.get("factor") or 1.0)
            attrs["attn_factor"] = _yarn_mscale(f, float(ms)) / _yarn_mscale(f, float(ms_all))
        if kind == "yarn" and sc.get("truncate") is False:  # gpt-oss: the ramp's ends not rounded
            attrs["truncate"] = False
    return attrs


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention(c: Ctx, i: int, x: str, *, qk_norm: bool | str, gated: bool, norm_offset: float = 0.0,
              sinks: bool = False) -> str:
    """Self-attention over the KV cache. x: [T,H] normed input -> [T,H] (before the residual).
    qk_norm True norms each head of q and k (Hunyuan after RoPE, the others before); "all"
    (MiniMax-M2) one norm over all heads of q and one over all of k. A sliding layer
    (cfg.window(i)) attends to its window; `sinks` adds a learnt per-head logit to each softmax
    row (gpt-oss's attn_sinks)."""
    cfg, p = c.cfg, f"blk.{i}."
    hq, hkv, d, H = cfg.n_head, cfg.kv_heads(i), cfg.head_size(i), cfg.hidden_size
    bias = cfg.attention_bias
    q_rows = hq * d * (2 if gated else 1)  # a gated q projection carries the output gate per head

    def proj(role: str, rows: int) -> str:
        y = c.op(Op.MATMUL, p + role, x, c.w(p + role, rows, H))
        return c.op(Op.ADD, p + role + "_b", y, c.w(p + role + ".bias", rows)) if bias else y

    q = proj("attn_q", q_rows)
    k = proj("attn_k", hkv * d)
    if qk_norm == "all":  # [T,hq*d] and [T,hkv*d]: the norm spans every head
        q, k = c.norm(p + "attn_q_norm", q), c.norm(p + "attn_k_norm", k)
    k = c.view(p + "k_heads", k, c.T, hkv, d)  # [T,hkv,d]
    if cfg.k_eq_v and cfg.window(i) is None:  # Gemma 4's full layers: the values are the unnormed keys
        v = k
    else:
        v = c.view(p + "v_heads", proj("attn_v", hkv * d), c.T, hkv, d)  # [T,hkv,d]
    if cfg.arch == "gemma4":  # an RMS norm of each value head, without a weight
        v = c.op(Op.RMS_NORM_PLAIN, p + "attn_v_norm", v, eps=cfg.rms_norm_eps)
    gate = None
    if gated:
        qg = c.view(p + "qg_heads", q, c.T, hq, 2 * d)  # [T,hq,2d]: per head [query | gate]
        q = c.cut(p + "q_heads", qg, 2, 0, d)
        gate = c.view(p + "attn_gate", c.cut(p + "gate_heads", qg, 2, d, 2 * d), c.T, hq * d)
    else:
        q = c.view(p + "q_heads", q, c.T, hq, d)  # [T,hq,d]
    late = cfg.qk_norm_after_rope
    if qk_norm is True and not late:
        q = c.norm(p + "attn_q_norm", q, norm_offset)
        k = c.norm(p + "attn_k_norm", k, norm_offset)
    ra = rope_attrs(cfg, i)
    q = c.op(Op.ROPE, p + "q_rope", q, "positions", **ra)
    k = c.op(Op.ROPE, p + "k_rope", k, "positions", **ra)
    if qk_norm is True and late:  # Hunyuan: the norms see the rotated heads
        q = c.norm(p + "attn_q_norm", q, norm_offset)
        k = c.norm(p + "attn_k_norm", k, norm_offset)
    if cfg.attn_temperature_beta:
        q = c.op(Op.ATTN_TEMP, p + "q_temp", q, "positions", beta=cfg.attn_temperature_beta,
                 length=cfg.attn_temperature_len)
    kv_t = c.opts.kv_type
    ck = c.state(p + "cache_k", ("KV", hkv, d), kv_t)
    cv = c.state(p + "cache_v", ("KV", hkv, d), kv_t)
    k_all = c.op(Op.KV_APPEND, p + "cache_k.next", ck, k)  # [KV+T,hkv,d]
    v_all = c.op(Op.KV_APPEND, p + "cache_v.next", cv, v)
    c.result(p + "cache_k", k_all)
    c.result(p + "cache_v", v_all)
    extra = (c.w(p + "attn_sinks", hq),) if sinks else ()
    o = c.op(Op.ATTENTION, p + "kqv", q, k_all, v_all, *extra, scale=cfg.attn_scale, window=cfg.window(i))  # [T,hq,d]
    o = c.view(p + "kqv_flat", o, c.T, hq * d)
    if gate is not None:
        o = c.op(Op.MUL, p + "kqv_gated", o, c.op(Op.SIGMOID, p + "attn_gate_sig", gate))
    y = c.op(Op.MATMUL, p + "attn_output", o, c.w(p + "attn_output", H, hq * d))
    if cfg.out_bias:
        y = c.op(Op.ADD, p + "attn_output_b", y, c.w(p + "attn_output.bias", H))
    return y


def ffn(c: Ctx, prefix: str, x: str, n_ff: int, suffix: str = "") -> str:
    """SwiGLU FFN: [T,H] -> [T,H]. suffix '_shexp' names a shared expert."""
    H = c.cfg.hidden_size
    g = c.op(Op.MATMUL, f"{prefix}ffn_gate{suffix}", x, c.w(f"{prefix}ffn_gate{suffix}", n_ff, H))
    u = c.op(Op.MATMUL, f"{prefix}ffn_up{suffix}", x, c.w(f"{prefix}ffn_up{suffix}", n_ff, H))
    glu = Op.GEGLU if c.cfg.hidden_act == "gelu_pytorch_tanh" else Op.SWIGLU
    h = c.op(glu, f"{prefix}ffn_swiglu{suffix}", g, u)  # [T,n_ff]
    return c.op(Op.MATMUL, f"{prefix}ffn_down{suffix}", h, c.w(f"{prefix}ffn_down{suffix}", H, n_ff))


def decoder_layer(c: Ctx, i: int, x: str, *, qk_norm: bool, ffn_norm: str = "ffn_norm") -> str:
    """Pre-norm attention, then the SwiGLU FFN or (on the config's MoE layers) the experts,
    each with its residual: [T,H] -> [T,H]. `ffn_norm` is the GGUF name of the pre-FFN norm
    (Seed-OSS's is `attn_post_norm`)."""
    p = f"blk.{i}."
    a = attention(c, i, c.norm(p + "attn_norm", x), qk_norm=qk_norm, gated=False)
    x = c.op(Op.ADD, p + "attn_residual", x, a)  # [T,H]
    h = c.norm(p + ffn_norm, x)
    f = moe(c, i, h) if c.cfg.is_moe_layer(i) else ffn(c, p, h, c.cfg.intermediate_size)
    return c.op(Op.ADD, p + "l_out", x, f)


def route(c: Ctx, p: str, logits: str) -> tuple[str, str]:
    """Expert ids [T,k] i32 and weights [T,k] f32 from router logits [T,E]. Softmax routers
    (Qwen, gpt-oss) take the top-k probabilities, ERNIE's after adding a correction bias to
    choose; sigmoid routers (GLM-4.5, MiniMax-M2, DeepSeek-V3) choose by sigmoid + a per-expert
    bias (GGUF exp_probs_b) within the best groups and weigh by the sigmoid alone, renormalised
    and scaled by routed_scaling_factor."""
    cfg, k = c.cfg, c.cfg.n_expert_used
    if cfg.sigmoid_router:
        bias = c.w(p + "exp_probs_b.bias", cfg.n_expert)
        groups = {"groups": cfg.n_group, "groups_used": cfg.topk_group} if cfg.n_group > 1 else {}
        ids = c.op(Op.MOE_TOPK_BIASED, p + "ffn_moe_topk", logits, bias, k=k, **groups)
        scale = {"scale": cfg.routed_scaling_factor} if cfg.routed_scaling_factor != 1.0 else {}
        return ids, c.op(Op.MOE_WEIGHTS_SIGMOID, p + "ffn_moe_weights", logits, ids, norm=cfg.norm_topk_prob, **scale)
    if cfg.router_bias:
        ids = c.op(Op.MOE_TOPK_BIAS, p + "ffn_moe_topk", logits, c.w(p + "exp_probs_b.bias", cfg.n_expert), k=k)
    else:
        ids = c.op(Op.MOE_TOPK, p + "ffn_moe_topk", logits, k=k)
    return ids, c.op(Op.MOE_WEIGHTS, p + "ffn_moe_weights", logits, ids, norm=cfg.norm_topk_prob)


def moe(c: Ctx, i: int, x: str, biased: bool = False) -> str:
    """Routed experts (+ the shared expert where the model has one: sigmoid-gated for Qwen,
    plainly added for ERNIE, Hunyuan, GLM and DeepSeek). `biased`: the router and every expert
    projection carry a bias (gpt-oss)."""
    cfg, p = c.cfg, f"blk.{i}."
    E, N, H = cfg.n_expert, cfg.moe_intermediate_size, cfg.hidden_size
    logits = c.op(Op.MATMUL, p + "ffn_gate_inp", x, c.w(p + "ffn_gate_inp", E, H))  # [T,E]
    if biased:
        logits = c.op(Op.ADD, p + "ffn_gate_inp_b", logits, c.w(p + "ffn_gate_inp.bias", E))
    ids, wts = route(c, p, logits)  # [T,k], [T,k]

    def experts(role: str, h: str, rows: int, cols: int) -> str:  # [T,(k,)cols] -> [T,k,rows]
        y = c.op(Op.MOE_MATMUL, p + role, h, c.w(p + role, E, rows, cols), ids)
        return c.op(Op.ADD_ID, p + role + "_b", y, c.w(p + role + ".bias", E, rows), ids) if biased else y

    g, u = experts("ffn_gate_exps", x, N, H), experts("ffn_up_exps", x, N, H)  # [T,k,N]
    if cfg.swiglu_limit:
        h = c.op(Op.SWIGLU_OAI, p + "ffn_moe_swiglu", g, u, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    else:
        h = c.op(Op.SWIGLU, p + "ffn_moe_swiglu", g, u)
    y = experts("ffn_down_exps", h, H, N)  # [T,k,H]
    out = c.op(Op.MOE_SUM, p + "ffn_moe_out", y, wts)  # [T,H]
    if cfg.shared_expert_intermediate_size:
        s = ffn(c, p, x, cfg.shared_expert_intermediate_size, "_shexp")
        if cfg.shared_expert_gated:
            sg = c.op(Op.MATMUL, p + "ffn_gate_inp_shexp", x, c.w(p + "ffn_gate_inp_shexp", 1, H))  # [T,1]
            s = c.op(Op.MUL, p + "ffn_shexp_gated", s, c.op(Op.SIGMOID, p + "ffn_shexp_sig", sg))
        out = c.op(Op.ADD, p + "ffn_moe_shexp", out, s)
    return out


def head(c: Ctx, x: str) -> None:
    cfg = c.cfg
    x = c.norm("output_norm", x, 1.0 if cfg.zero_centred_norms else 0.0)
    if c.opts.logits == "last" and c.T != 1:
        x = c.cut("output_last", x, 0, "T-1", "T")  # [1,H]
    w = "token_embd.weight" if cfg.tie_word_embeddings else c.w("output", cfg.vocab_size, cfg.hidden_size)
    y = c.op(Op.MATMUL, "result_output", x, w)  # [T,V]
    if cfg.final_logit_softcapping:
        y = c.op(Op.SOFTCAP, "result_softcap", y, cap=cfg.final_logit_softcapping)
    c.result("logits", y)


F32_T = F32  # re-exported for builders that keep recurrent state in f32
