"""Node counts: the exact count of a built graph and a closed-form estimate without one.

The estimate is graphir's analogue of ggml's max-nodes budget (REFERENCE §3), but derived
from the builders' structure instead of a heuristic: per region (attention, delta-net, FFN,
MoE) a fixed number of nodes per participating device, a few on the lead device, the exit
(an add, plus an all-reduce when split), and one copy per device a value must reach. Device
participation comes from the same plan `place_graph` uses (passes.plan), so the formula knows
which devices get zero granules. Tests hold it to the builder: `actual <= estimate <= 1.05 *
actual` for every architecture, option and device count. Our graphs do not grow with the
u-batch (fused delta-net, symbolic T), so `ubatch` only feeds the llama.cpp heuristic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from graphir.graph import Graph
from graphir.models.common import BuildOptions
from graphir.models.config import ModelConfig

from passes.devices import parse_devices, parse_ts
from passes.transfers import devices_of
from passes.place import layer_devices, pinned_ratios
from passes.plan import LAYER_ONLY, Recurrent, RegionPlan, plan_graph, type_from_scheme

HEADROOM = 0.02  # the budget allows 2% over the formula, for graphs the tests do not cover


@dataclass(frozen=True)
class NodeCount:
    total: int
    per_device: tuple[tuple[str, int], ...]  # a collective counts once on each of its devices


@dataclass(frozen=True)
class NodeEstimate:
    exact: int  # the closed form's count
    budget: int  # exact plus headroom: what to allocate
    per_device: tuple[tuple[str, int], ...]
    heuristic: int  # ik_llama.cpp's budget for the same model and batch (REFERENCE §3)
    n_tensors: int  # weight tensors of the model (what the heuristic scales with)


def count_nodes(g: Graph) -> NodeCount:
    per: dict[str, int] = {d: 0 for d in devices_of(g)} if g.placed else {}
    for n in g.nodes:
        for d in n.devices or ("-",):
            per[d] = per.get(d, 0) + 1
    return NodeCount(len(g.nodes), tuple(per.items()))


# ---- per-region closed forms -----------------------------------------------------------------
def _mla_nodes(cfg: ModelConfig) -> int:
    """MLA (deepseek_v3.mla): the same on every device of a split, the latent cache replicated."""
    # norm 2, q 2 (+4 through q_lora), q views/rope/absorb 6, kv_a 2, latent 4, k_pe 3, cache 4,
    # q_full 1, attention 2, v_b 2, output 3
    return 31 + (4 if cfg.q_lora_rank else 0)


def _attn_nodes(cfg: ModelConfig, merged: bool, split: bool = False, layer: int = 0) -> tuple[int, int]:
    """(nodes per participating device, nodes on the lead only) of one attention block
    (gemma3's and gemma4's, never split, with its post-attention norm; gemma4's value norm,
    and no value projection on its full layers with attention_k_eq_v)."""
    if cfg.arch == "deepseek_v3":
        return _mla_nodes(cfg), 0
    gated, qk_norm, bias = cfg.is_hybrid, cfg.qk_norm, cfg.attention_bias
    per = 2 + 6 + 2 + 2 + 6 + 2 + 2  # norm, q/k/v, k/v heads, rope, cache, attention, wo
    per += (6 if bias else 0) + (4 + 2 if gated else 1) + (4 if qk_norm else 0) + (2 if merged else 0)
    per += 1 if cfg.attn_temperature_beta else 0  # attn_temp after the query's rope
    per += 1 if cfg.arch == "gpt_oss" else 0  # the sinks' weight
    per += 2 if cfg.arch in ("gemma3", "gemma4") else 0  # the norm after attention
    per += 1 if cfg.arch == "gemma4" else 0  # the value norm
    per -= 3 if cfg.k_eq_v and cfg.window(layer) is None else 0  # values are the keys: no attn_v
    if split and cfg.arch == "minimax_m2":
        per += 2  # each device slices its heads out of the whole, normed q and k
    return per, (2 if cfg.out_bias else 0)


def _separate_projections(cfg: ModelConfig) -> bool:
    """Qwen3.5's delta-net: four input projections instead of Qwen3-Next's grouped two."""
    return cfg.arch in ("qwen3_5", "qwen3_5_moe")


def _delta_nodes(cfg: ModelConfig, opts: BuildOptions, split: bool) -> int:
    # 49 nodes (Qwen3.5: 39, its projections need no per-head slicing); a non-f32 activation
    # type adds two casts (the decay in, the output back); split adds per device the conv state
    # and weight as three pieces plus a concat, and three sliced results instead of one (+11),
    # and for Qwen3.5 the [q | k | v] projection weight as three pieces plus a concat (+3)
    sep = _separate_projections(cfg)
    base = 39 if sep else 49
    return base + (2 if opts.act_dtype != "f32" else 0) + ((14 if sep else 11) if split else 0)


def _exit(p: int) -> int:
    return 2 if p > 1 else 1


class _Tally:
    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = tuple(devices)
        self.per = [0] * max(1, len(devices))

    def on(self, j: int, k: int) -> None:
        self.per[j] += k

    def each(self, js: Iterable[int], k: int) -> None:
        for j in js:
            self.per[j] += k

    def exit(self, devs: Sequence[int], lead: int) -> int:
        self.on(lead, 1)
        if len(devs) > 1:
            self.each(devs, 1)
        return _exit(len(devs))


def _merges(cfg: ModelConfig, opts: BuildOptions, i: int, merges: Sequence[str]
            ) -> tuple[bool, bool, bool, bool, bool, bool]:
    """Which merges apply in layer i: (qkv, dense up/gate, shared-expert up/gate, expert up/gate,
    delta-net in+ba, router+shared expert)."""
    H, p, L = cfg.hidden_size, f"blk.{i}.", cfg.n_layer

    def t(role: str, *shape: int):  # type: ignore[no-untyped-def]
        return opts.quant(p + role + ".weight", shape, L)

    qkv = up = sh = ex = False
    # MLA has no q/k/v trio, nor a Gemma 4 full layer whose values are its keys (no attn_v)
    trio = cfg.arch != "deepseek_v3" and not (cfg.k_eq_v and cfg.window(i) is None)
    if "merge_qkv" in merges and not cfg.is_recurrent(i) and trio:
        rows = cfg.n_head * cfg.head_size(i) * (2 if cfg.is_hybrid else 1)
        kv = cfg.kv_heads(i) * cfg.head_size(i)
        qkv = t("attn_q", rows, H) == t("attn_k", kv, H)
    if "merge_up_gate" in merges:
        if cfg.is_moe_layer(i):
            N, E, Ns = cfg.moe_intermediate_size, cfg.n_expert, cfg.shared_expert_intermediate_size
            ex = t("ffn_gate_exps", E, N, H) == t("ffn_up_exps", E, N, H)
            sh = bool(Ns) and t("ffn_gate_shexp", Ns, H) == t("ffn_up_shexp", Ns, H)
        else:
            N = cfg.intermediate_size
            up = t("ffn_gate", N, H) == t("ffn_up", N, H)
    ssm = router = False
    if "merge_siblings" in merges:
        nk, nv, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_value_head_dim
        if cfg.is_recurrent(i) and _separate_projections(cfg):
            ssm = len({t("attn_qkv", cfg.conv_dim, H), t("attn_gate", nv * dv, H), t("ssm_beta", nv, H),
                       t("ssm_alpha", nv, H)}) == 1
        elif cfg.is_recurrent(i):
            rows = 2 * nk * cfg.linear_key_head_dim + 2 * nv * dv
            ssm = t("ssm_in", rows, H) == t("ssm_ba", 2 * nv, H)
        Ns = cfg.shared_expert_intermediate_size
        if cfg.is_moe_layer(i) and Ns and cfg.shared_expert_gated:
            ty = {t("ffn_gate_inp", cfg.n_expert, H), t("ffn_gate_shexp", Ns, H), t("ffn_up_shexp", Ns, H),
                  t("ffn_gate_inp_shexp", 1, H)}
            # merge_up_gate first takes the shared gate and up away from the router's group
            first = "merge_up_gate" not in merges or merges.index("merge_siblings") < merges.index("merge_up_gate")
            router = len(ty) == 1 and (first or not sh)
            sh = sh and not router
    return qkv, up, sh, ex, ssm, router


def _mixer(tally: _Tally, cfg: ModelConfig, opts: BuildOptions, i: int, r: RegionPlan, qkv: bool,
           ssm: bool = False) -> int:
    devs = r.devices
    if r.kind == "attn":
        per, lead = _attn_nodes(cfg, qkv, len(devs) > 1, i)
    else:
        per, lead = _delta_nodes(cfg, opts, len(devs) > 1) + (2 if ssm else 0), 0
    tally.each(devs, per)
    tally.on(r.lead, lead)
    return per * len(devs) + lead + tally.exit(devs, r.lead)


def _ffn(tally: _Tally, cfg: ModelConfig, r: RegionPlan, up: bool, sh: bool, ex: bool, router: bool = False) -> int:
    devs = r.devices
    if r.kind == "ffn":
        per = 9 + (2 if up else 0)
        tally.each(devs, per)
        return per * len(devs) + tally.exit(devs, r.lead)
    R = r.share("exps").devices
    S = r.share("shexp").devices if cfg.shared_expert_intermediate_size else ()
    both = [j for j in R if j in S]
    routed, shared = _routed_nodes(cfg) + (2 if ex else 0), _shared_nodes(cfg) + (2 if sh or router else 0)
    if _biased(cfg):  # router bias everywhere, gate / up biases with their columns, the down bias once
        routed += 4
        tally.each(devs, 2)
        tally.on(r.lead, 2)
        total = 2 * len(devs) + 2
    else:
        total = 0
    tally.each(devs, 2)
    tally.each(R, routed)
    tally.each(S, shared)
    tally.each(both, 1)
    return total + 2 * len(devs) + routed * len(R) + shared * len(S) + len(both) + tally.exit(devs, r.lead)


def _biased(cfg: ModelConfig) -> bool:
    """Router and experts with biases (gpt-oss): 8 more nodes per MoE layer (4 weights, 4 adds)."""
    return cfg.arch == "gpt_oss"


def _routed_nodes(cfg: ModelConfig) -> int:
    """Router, top-k, weights, the three expert matmuls, swiglu and sum (12 nodes), with ERNIE's
    correction-bias leaf, on each device holding a slice of the experts."""
    return 12 + (1 if cfg.router_bias else 0)


def _shared_nodes(cfg: ModelConfig) -> int:
    """The shared expert's FFN (7 nodes), with Qwen's sigmoid gate (weight, matmul, sigmoid, mul)."""
    return 11 if cfg.shared_expert_gated else 7


def _ends(cfg: ModelConfig, opts: BuildOptions) -> tuple[int, int]:
    """Nodes before the layers (inputs, embedding) and after (norm, head, logits)."""
    last = 1 if (opts.phase == "pp" and opts.logits == "last") else 0
    return 4, 2 + last + (0 if cfg.tie_word_embeddings else 1) + 2 + (1 if cfg.final_logit_softcapping else 0)


def n_tensors(cfg: ModelConfig, layers: Sequence[int]) -> int:
    """Weight tensors of the model (GGUF's tensor count for the layers kept)."""
    total = 2 + (0 if cfg.tie_word_embeddings else 1)
    for i in layers:
        if cfg.is_recurrent(i):
            total += 8 + (2 if _separate_projections(cfg) else 0)
        else:
            mla = (2 + (2 if cfg.q_lora_rank else 0)) if cfg.arch == "deepseek_v3" else 0  # kv_a norm, k_b, v_b
            total += 5 + (3 if cfg.attention_bias else 0) + (1 if cfg.out_bias else 0) + (2 if cfg.qk_norm else 0) + mla
            total += 1 if cfg.arch == "gpt_oss" else 0  # attn_sinks
            total += 2 if cfg.arch in ("gemma3", "gemma4") else 0  # post_attention_norm, post_ffw_norm
            total += (1 - (1 if cfg.k_eq_v and cfg.window(i) is None else 0)) if cfg.arch == "gemma4" else 0  # scale, no v
        if cfg.is_moe_layer(i):
            shared = (4 if cfg.shared_expert_gated else 3) if cfg.shared_expert_intermediate_size else 0
            total += 5 + shared + (1 if cfg.router_bias else 0) + (4 if _biased(cfg) else 0)
        else:
            total += 4
    return total


def heuristic_budget(cfg: ModelConfig, n_tokens: int, n_tens: int, n_graph_devices: int = 1) -> int:
    """ik_llama.cpp's max-nodes budget (REFERENCE §3): max(40·tokens, 32·tensors·devices) for
    Qwen3-Next / Qwen3.5-MoE since PR 1296, the constant 65536 for the others since PR 1306."""
    if cfg.arch in ("qwen3_next", "qwen3_5_moe"):
        return max(40 * n_tokens, 32 * n_tens * max(1, n_graph_devices))
    return 65536


def estimate_nodes(cfg: ModelConfig, opts: BuildOptions | None = None, *, merges: Sequence[str] = (),
                   split: str | None = None, devices: Sequence[str] | str | int = 1,
                   ts: Sequence[float] | str | None = None, max_gpu: int | None = None,
                   recurrent: Recurrent = "single", layer_groups: Mapping[int, Sequence[str]] | None = None,
                   ubatch: int = 512, layers: Sequence[int] | None = None) -> NodeEstimate:
    """Closed-form node count of build(cfg, opts) after `merges` and the `split` placement
    (None, "layer" or "graph") with the placer's own options; no graph is built."""
    opts = opts or BuildOptions()
    if split == "graph" and cfg.arch in LAYER_ONLY:  # place_graph places such families by layer
        split = "layer"
    devs = parse_devices(devices) if isinstance(devices, (int, str)) else tuple(devices)
    ratios = parse_ts(ts, len(devs))
    idx = list(layers if layers is not None else range(cfg.n_layer))
    pre, post = _ends(cfg, opts)
    tally = _Tally(devs if split else ("-",))
    copies = 0
    total = pre + post
    if split == "graph":
        pinned = pinned_ratios(devs, ratios, layer_groups) if layer_groups else None
        plan = plan_graph(cfg, devs, type_from_scheme(cfg, opts.quant), ts=ratios, max_gpu=max_gpu,
                          recurrent=recurrent, layers=idx, pinned=pinned)
        emb, head = plan.embed, plan.head
        holders, rope = {emb}, set()
        for i, m, f in plan.layers:
            qkv, up, sh, ex, ssm, router = _merges(cfg, opts, i, merges)
            for r in (m, f):
                need = [j for j in r.devices if j not in holders]
                tally.each(need, 1)
                copies += len(need)
                total += (_mixer(tally, cfg, opts, i, r, qkv, ssm) if r is m
                          else _ffn(tally, cfg, r, up, sh, ex, router))
                holders = set(r.devices)
            if m.kind == "attn":
                rope.update(m.devices)
    else:
        where = {i: 0 for i in idx}
        if split == "layer":
            where = layer_devices(cfg, len(devs), idx, ratios)
        emb = where[idx[0]] if idx else 0
        head = where[idx[-1]] if idx else len(devs) - 1
        holders, rope = {emb}, set()
        for i in idx:
            d = where[i]
            qkv, up, sh, ex, ssm, router = _merges(cfg, opts, i, merges)
            if d not in holders:
                tally.on(d, 1)
                copies += 1
            holders = {d}
            if cfg.is_recurrent(i):
                k = _delta_nodes(cfg, opts, False) + 1 + (2 if ssm else 0)
            else:
                per, lead = _attn_nodes(cfg, qkv, layer=i)
                k = per + lead + 1
                rope.add(d)
            if cfg.is_moe_layer(i):
                Ns = cfg.shared_expert_intermediate_size
                k += 2 + _routed_nodes(cfg) + (2 if ex else 0) + 1
                k += (_shared_nodes(cfg) + (2 if sh or router else 0) + 1) if Ns else 0
                k += 8 if _biased(cfg) else 0
            else:
                k += 9 + (2 if up else 0) + 1 + (2 if cfg.arch in ("gemma3", "gemma4") else 0)  # Gemma's post-FFN norm
                k += 2 if cfg.arch == "gemma4" else 0  # its layer_output_scale and the product
            tally.on(d, k)
            total += k
    extra = [j for j in sorted(rope) if j != emb]  # positions copied to each device with attention
    tally.each(extra, 1)
    if head not in holders:
        tally.on(head, 1)
        copies += 1
    if cfg.tie_word_embeddings and head != emb:  # the head reads the embedding table there
        tally.on(head, 1)
        copies += 1
    tally.on(emb, pre)
    tally.on(head, post)
    exact = total + copies + len(extra)
    n_tens = n_tensors(cfg, idx)
    n_tokens = ubatch if opts.phase == "pp" else 1
    heur = heuristic_budget(cfg, n_tokens, n_tens, len(devs) if split == "graph" else 1)
    per = tuple((d, k) for d, k in zip(tally.devices, tally.per))
    return NodeEstimate(exact, math.ceil(exact * (1 + HEADROOM)), per, heur, n_tens)
