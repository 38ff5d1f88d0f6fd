"""Blocks shared by the architecture builders: embedding, attention, FFN, MoE, output head.

Shape comments use T = tokens in this micro-batch, KV = tokens already cached, H = hidden.
Weights are [out, in] (torch's layout); names follow GGUF (`blk.{i}.attn_q.weight`).
"""

from __future__ import annotations

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
    return c.op(Op.GET_ROWS, "inp_embd", table, "tokens", dtype=c.act.name)  # [T,H]


def rope_attrs(cfg: ModelConfig) -> dict[str, object]:
    attrs: dict[str, object] = {"n_rot": cfg.n_rot, "theta": cfg.rope_theta}
    sc = dict(cfg.rope_scaling)
    kind = sc.get("rope_type", sc.get("type"))
    if kind:
        attrs["scaling"] = str(kind)
        for src, dst in (("factor", "factor"), ("low_freq_factor", "low_freq_factor"),
                         ("high_freq_factor", "high_freq_factor"), ("original_max_position_embeddings", "original_ctx"),
                         ("attention_factor", "attn_factor"), ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if sc.get(src) is not None:
                attrs[dst] = float(sc[src]) if dst != "original_ctx" else int(sc[src])
    return attrs


def attention(c: Ctx, i: int, x: str, *, qk_norm: bool, gated: bool, norm_offset: float = 0.0) -> str:
    """Self-attention over the KV cache. x: [T,H] normed input -> [T,H] (before the residual)."""
    cfg, p = c.cfg, f"blk.{i}."
    hq, hkv, d, H = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.hidden_size
    bias = cfg.attention_bias
    q_rows = hq * d * (2 if gated else 1)  # a gated q projection carries the output gate per head

    def proj(role: str, rows: int) -> str:
        y = c.op(Op.MATMUL, p + role, x, c.w(p + role, rows, H))
        return c.op(Op.ADD, p + role + "_b", y, c.w(p + role + ".bias", rows)) if bias else y

    q = proj("attn_q", q_rows)
    k = c.view(p + "k_heads", proj("attn_k", hkv * d), c.T, hkv, d)  # [T,hkv,d]
    v = c.view(p + "v_heads", proj("attn_v", hkv * d), c.T, hkv, d)  # [T,hkv,d]
    gate = None
    if gated:
        qg = c.view(p + "qg_heads", q, c.T, hq, 2 * d)  # [T,hq,2d]: per head [query | gate]
        q = c.cut(p + "q_heads", qg, 2, 0, d)
        gate = c.view(p + "attn_gate", c.cut(p + "gate_heads", qg, 2, d, 2 * d), c.T, hq * d)
    else:
        q = c.view(p + "q_heads", q, c.T, hq, d)  # [T,hq,d]
    if qk_norm:
        q = c.norm(p + "attn_q_norm", q, norm_offset)
        k = c.norm(p + "attn_k_norm", k, norm_offset)
    ra = rope_attrs(cfg)
    q = c.op(Op.ROPE, p + "q_rope", q, "positions", **ra)
    k = c.op(Op.ROPE, p + "k_rope", k, "positions", **ra)
    kv_t = c.opts.kv_type
    ck = c.state(p + "cache_k", ("KV", hkv, d), kv_t)
    cv = c.state(p + "cache_v", ("KV", hkv, d), kv_t)
    k_all = c.op(Op.KV_APPEND, p + "cache_k.next", ck, k)  # [KV+T,hkv,d]
    v_all = c.op(Op.KV_APPEND, p + "cache_v.next", cv, v)
    c.result(p + "cache_k", k_all)
    c.result(p + "cache_v", v_all)
    o = c.op(Op.ATTENTION, p + "kqv", q, k_all, v_all, scale=d ** -0.5)  # [T,hq,d]
    o = c.view(p + "kqv_flat", o, c.T, hq * d)
    if gate is not None:
        o = c.op(Op.MUL, p + "kqv_gated", o, c.op(Op.SIGMOID, p + "attn_gate_sig", gate))
    y = c.op(Op.MATMUL, p + "attn_output", o, c.w(p + "attn_output", H, hq * d))
    if bias:
        y = c.op(Op.ADD, p + "attn_output_b", y, c.w(p + "attn_output.bias", H))
    return y


def ffn(c: Ctx, prefix: str, x: str, n_ff: int, suffix: str = "") -> str:
    """SwiGLU FFN: [T,H] -> [T,H]. suffix '_shexp' names a shared expert."""
    H = c.cfg.hidden_size
    g = c.op(Op.MATMUL, f"{prefix}ffn_gate{suffix}", x, c.w(f"{prefix}ffn_gate{suffix}", n_ff, H))
    u = c.op(Op.MATMUL, f"{prefix}ffn_up{suffix}", x, c.w(f"{prefix}ffn_up{suffix}", n_ff, H))
    h = c.op(Op.SWIGLU, f"{prefix}ffn_swiglu{suffix}", g, u)  # [T,n_ff]
    return c.op(Op.MATMUL, f"{prefix}ffn_down{suffix}", h, c.w(f"{prefix}ffn_down{suffix}", H, n_ff))


def moe(c: Ctx, i: int, x: str) -> str:
    """Routed experts (+ the sigmoid-gated shared expert where the model has one)."""
    cfg, p = c.cfg, f"blk.{i}."
    E, k, N, H = cfg.n_expert, cfg.n_expert_used, cfg.moe_intermediate_size, cfg.hidden_size
    logits = c.op(Op.MATMUL, p + "ffn_gate_inp", x, c.w(p + "ffn_gate_inp", E, H))  # [T,E]
    ids = c.op(Op.MOE_TOPK, p + "ffn_moe_topk", logits, k=k)  # [T,k]
    wts = c.op(Op.MOE_WEIGHTS, p + "ffn_moe_weights", logits, ids, norm=cfg.norm_topk_prob)  # [T,k]
    g = c.op(Op.MOE_MATMUL, p + "ffn_gate_exps", x, c.w(p + "ffn_gate_exps", E, N, H), ids)  # [T,k,N]
    u = c.op(Op.MOE_MATMUL, p + "ffn_up_exps", x, c.w(p + "ffn_up_exps", E, N, H), ids)
    h = c.op(Op.SWIGLU, p + "ffn_moe_swiglu", g, u)
    y = c.op(Op.MOE_MATMUL, p + "ffn_down_exps", h, c.w(p + "ffn_down_exps", E, H, N), ids)  # [T,k,H]
    out = c.op(Op.MOE_SUM, p + "ffn_moe_out", y, wts)  # [T,H]
    if cfg.shared_expert_intermediate_size:
        s = ffn(c, p, x, cfg.shared_expert_intermediate_size, "_shexp")
        sg = c.op(Op.MATMUL, p + "ffn_gate_inp_shexp", x, c.w(p + "ffn_gate_inp_shexp", 1, H))  # [T,1]
        s = c.op(Op.MUL, p + "ffn_shexp_gated", s, c.op(Op.SIGMOID, p + "ffn_shexp_sig", sg))
        out = c.op(Op.ADD, p + "ffn_moe_shexp", out, s)
    return out


def head(c: Ctx, x: str) -> None:
    cfg = c.cfg
    x = c.norm("output_norm", x, 1.0 if cfg.is_hybrid else 0.0)
    if c.opts.logits == "last" and c.T != 1:
        x = c.cut("output_last", x, 0, "T-1", "T")  # [1,H]
    w = "token_embd.weight" if cfg.tie_word_embeddings else c.w("output", cfg.vocab_size, cfg.hidden_size)
    c.result("logits", c.op(Op.MATMUL, "result_output", x, w))  # [T,V]


F32_T = F32  # re-exported for builders that keep recurrent state in f32
