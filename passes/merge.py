"""Load-time fusions (REFERENCE §4) as graph passes: `merge_qkv`, `merge_up_gate`, `merge_siblings`.

Several matmuls that read the same activation become one matmul on the concatenated weight,
followed by slices that keep the old names (so nothing downstream changes):

    %blk.3.attn_qkv.weight = concat(%blk.3.attn_q.weight, %blk.3.attn_k.weight, %blk.3.attn_v.weight) {dim=0}
    %blk.3.attn_qkv = matmul(%blk.3.attn_norm, %blk.3.attn_qkv.weight)
    %blk.3.attn_q = slice(%blk.3.attn_qkv) {dim=1, start=0, stop=4096}   ... and attn_k, attn_v

The merged weight is a `concat` node over the original weight leaves: the op table stays
closed, the weight leaves (and the loader) stay unchanged, and a concat whose inputs are all
weights is a load-time constant (the executor folds it, the cost model prices it as free).

Members are found by name, with any device suffix, so both passes work before and after
graph split: after `place_graph` they merge each device's slices (`blk.3.attn_q#1`, ...),
which ik_llama.cpp cannot do. Weights must share one storage type (a concat cannot mix
quant types); `merge_qkv` falls back to Q and K when V differs, as llama.cpp does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graphir.graph import Graph, Node
from graphir.ops import LEAVES, Op

from passes.emit import Emitter


@dataclass(frozen=True)
class MergeRule:
    op: Op  # matmul or moe_matmul
    members: tuple[str, ...]  # roles, in concat order
    merged: str  # role of the merged matmul
    fallback: int = 0  # merge only the first k members when not all types agree (0: none)
    fallback_name: str = ""
    marker: tuple[str, str] = ("", "")  # (role, attr): apply only where that node carries that attr


QKV = (MergeRule(Op.MATMUL, ("attn_q", "attn_k", "attn_v"), "attn_qkv", 2, "attn_qk"),)
UP_GATE = (
    MergeRule(Op.MATMUL, ("ffn_gate", "ffn_up"), "ffn_gate_up"),
    MergeRule(Op.MATMUL, ("ffn_gate_shexp", "ffn_up_shexp"), "ffn_gate_up_shexp"),
    MergeRule(Op.MOE_MATMUL, ("ffn_gate_exps", "ffn_up_exps"), "ffn_gate_up_exps"),
)
# matmuls of one activation that no other merge joins: a delta-net layer's input projections
# (two in Qwen3-Next, four in Qwen3.5), and the router with the shared expert's gate, up and sigmoid gate (four
# matmuls of the post-attention norm). In a decode step each is a launch reading a few MB;
# one launch reads them all at the HBM rate. After fold_shared_expert only the router and
# the shared gate's logit are left as matmuls there: the pair merges instead.
SIBLINGS = (
    MergeRule(Op.MATMUL, ("ssm_in", "ssm_ba"), "ssm_in_ba"),
    MergeRule(Op.MATMUL, ("attn_qkv", "attn_gate", "ssm_b", "ssm_alpha"), "ssm_in_qkvzba"),
    MergeRule(Op.MATMUL, ("ffn_gate_inp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_gate_inp_shexp"), "ffn_router_shexp"),
    # only where the shared expert was folded (moe_topk {shared}): unfolded graphs merge as before
    MergeRule(Op.MATMUL, ("ffn_gate_inp", "ffn_gate_inp_shexp"), "ffn_router_shgate",
              marker=("ffn_moe_topk", "shared")),
)
_NAME = re.compile(r"(blk\.\d+\.)([A-Za-z0-9_]+)(#[A-Za-z0-9_.#\-]*)?$")


def merge_qkv(g: Graph) -> Graph:
    """Q, K, V projections -> one matmul (Q and K only when V's type differs)."""
    return _merge(g, QKV)


def merge_up_gate(g: Graph) -> Graph:
    """Gate and up projections of dense FFNs, shared experts and routed experts -> one matmul."""
    return _merge(g, UP_GATE)


def merge_siblings(g: Graph) -> Graph:
    """The delta-net input projections; the router with the shared expert's projections (with
    the shared gate's logit alone after fold_shared_expert). Runs before merge_up_gate (which
    would take the shared expert's gate and up alone)."""
    return _merge(g, SIBLINGS)


def _groups(g: Graph, rules: tuple[MergeRule, ...]) -> dict[str, tuple[MergeRule, tuple[Node, ...]]]:
    """First member name -> (rule, member nodes) for every mergeable group. Rules that share a
    first role are tried longest first: the first whose members are all there wins."""
    out: dict[str, tuple[MergeRule, tuple[Node, ...]]] = {}
    by_first: dict[str, list[MergeRule]] = {}
    for r in sorted(rules, key=lambda r: -len(r.members)):  # stable: equal lengths keep their order
        by_first.setdefault(r.members[0], []).append(r)
    for n in g.nodes:
        m = _NAME.match(n.name)
        if not m or m.group(2) not in by_first:
            continue
        for rule in by_first[m.group(2)]:
            got = _group(g, n, m, rule)
            if got is not None:
                out[n.name] = (rule, got)
                break
    return out


def _group(g: Graph, n: Node, m: re.Match[str], rule: MergeRule) -> tuple[Node, ...] | None:
    """The members of `rule` around first member `n` (all, or the fallback's first k), if mergeable."""
    if n.op != rule.op:
        return None  # already merged (a slice now) or not a projection
    pre, tail = m.group(1), m.group(3) or ""
    if rule.marker[0]:
        mark = g.index.get(pre + rule.marker[0] + tail)
        if mark is None or rule.marker[1] not in mark.attr:
            return None
    members = [g.index.get(pre + role + tail) for role in rule.members]
    ok = [x for x in members if x is not None and x.op == rule.op and x.device == n.device
          and x.inputs[0] == n.inputs[0] and x.inputs[2:] == n.inputs[2:]]
    if len(ok) != len(members):
        return None
    types = [g[x.inputs[1]].spec.dtype for x in ok]
    if all(t == types[0] for t in types):
        return tuple(ok)
    if rule.fallback and all(t == types[0] for t in types[:rule.fallback]):
        return tuple(ok[:rule.fallback])
    return None


def _merge(g: Graph, rules: tuple[MergeRule, ...]) -> Graph:
    groups = _groups(g, rules)
    if not groups:
        return g
    pos = {n.name: k for k, n in enumerate(g.nodes)}
    # weights defined after the first member are hoisted to it; only leaves can move freely
    plans: dict[str, tuple[MergeRule, tuple[Node, ...], list[str]]] = {}
    for first, (rule, members) in groups.items():
        late = [x.inputs[1] for x in members if pos[x.inputs[1]] > pos[first]]
        if all(g[w].op in LEAVES for w in late):
            plans[first] = (rule, members, late)
    skip = {x.name for _, ms, _ in plans.values() for x in ms} | {w for _, _, ws in plans.values() for w in ws}
    em = Emitter()
    for n in g.nodes:
        if n.name in plans:
            _emit_group(em, g, *plans[n.name])
        elif n.name not in skip:
            em.add(n)
    return Graph(tuple(em.nodes), g.meta)


def _emit_group(em: Emitter, g: Graph, rule: MergeRule, members: tuple[Node, ...], late: list[str]) -> None:
    first = members[0]
    m = _NAME.match(first.name)
    assert m is not None
    pre, tail = m.group(1), m.group(3) or ""
    merged = pre + (rule.merged if len(members) == len(rule.members) else rule.fallback_name) + tail
    for w in late:
        em.add(g[w])
    cdim = 0 if rule.op == Op.MATMUL else 1  # rows of [out,in]; per-expert rows of [E,out,in]
    w = em.emit(_weight_name(merged), Op.CONCAT, [x.inputs[1] for x in members], {"dim": cdim}, first.device)
    y = em.emit(merged, rule.op, [first.inputs[0], w, *first.inputs[2:]], {}, first.device)
    sdim = em.index[y].spec.rank - 1
    start = 0
    for x in members:
        size = int(g[x.inputs[1]].spec.shape[cdim])
        em.emit(x.name, Op.SLICE, [y], {"dim": sdim, "start": start, "stop": start + size}, x.device)
        start += size


def _weight_name(merged: str) -> str:
    k = merged.find("#")
    return merged + ".weight" if k < 0 else merged[:k] + ".weight" + merged[k:]
