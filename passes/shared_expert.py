"""`fold_shared_expert`: a MoE layer's sigmoid-gated shared expert as m more routed-expert slots.

Qwen3-Next adds to the routed experts a shared expert of intermediate size S, gated per token
by sigmoid(x · w_gate_inp_shexp). In a decode step that is six launches besides the MoE
kernels (gate and up matmuls, swiglu, down matmul, sigmoid, mul, add). When S is a multiple
m of the experts' intermediate size N, the shared expert is m experts of size N whose outputs
are summed: swiglu acts column by column, and the down projection sums over S. So it can ride
in the routed kernels as experts E..E+m-1 that every token picks, with weight sigmoid(gate):

    %ffn_moe_topk    = moe_topk(%logits) {k, shared=m}                       # i32 [T,k+m]
    %ffn_moe_weights = moe_weights(%logits, %ids, %ffn_gate_inp_shexp) {norm, shared=m}
    %ffn_gate_exps   = moe_matmul(%x, %ffn_gate_exps.weight.sh, %ids)         # [E+m,N,H] weight
    ... up and down likewise; %ffn_moe_out = moe_sum(...) is the layer's FFN result

The new expert weights are weight-only nodes (`concat` of the routed experts' weight with
`reshape`/`slice` pieces of the shared expert's), folded once at load. The result differs
from the unfolded graph only by rounding: the shared expert's output is summed inside
moe_sum instead of rounded, scaled and added separately.

Members are found by name with any device suffix (as passes/merge.py does), so the pass also
runs after placement, per device: after a graph split each device holds S_j shared and N_j
expert columns and folds when S_j is a multiple of N_j (which columns share a slot does not
matter for a sum). Layers whose nodes do not match the pattern exactly, or are already merged
(run it before merge_siblings / merge_up_gate), are left as they are. `place_graph` cannot
split a folded layer: fold after placement (the CLIs run placement first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graphir.graph import Graph, Node
from graphir.ops import Op

from passes.emit import Emitter, base_name

_NAME = re.compile(r"(blk\.\d+\.)([A-Za-z0-9_]+)(#[A-Za-z0-9_.#\-]*)?$")

# nodes of the unfolded shared expert that the fold removes (ffn_gate_inp_shexp stays)
GONE = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_swiglu_shexp", "ffn_down_shexp", "ffn_shexp_sig",
        "ffn_shexp_gated", "ffn_moe_shexp")
# routed nodes whose shape grows by the m shared slots
GROWN = ("ffn_gate_exps", "ffn_up_exps", "ffn_moe_swiglu", "ffn_down_exps")


@dataclass(frozen=True)
class _Match:
    pre: str  # "blk.3."
    tail: str  # device suffix ("" or "#1")
    m: int  # shared slots: S // N
    nodes: dict[str, Node]  # role -> node (every role of the pattern)
    leaves: tuple[str, ...]  # weight leaves the new weights read (emitted before them)

    def name(self, role: str) -> str:
        return self.pre + role + self.tail


def _weight_leaf(g: Graph, n: Node, i: int) -> Node | None:
    w = g.index.get(n.inputs[i]) if len(n.inputs) > i else None
    return w if w is not None and w.op == Op.WEIGHT else None


def _match(g: Graph, topk: Node) -> _Match | None:
    """The layer's pattern around moe_topk node `topk`, or None where anything differs."""
    mm = _NAME.match(topk.name)
    if not mm or mm.group(2) != "ffn_moe_topk" or topk.op != Op.MOE_TOPK or "shared" in topk.attr:
        return None
    pre, tail = mm.group(1), mm.group(3) or ""
    roles = ("ffn_moe_topk", "ffn_moe_weights", "ffn_moe_out", "ffn_gate_inp_shexp") + GROWN + GONE
    nodes = {r: g.index.get(pre + r + tail) for r in roles}
    if any(n is None or n.device != topk.device for n in nodes.values()):
        return None
    n: dict[str, Node] = nodes  # type: ignore[assignment]
    if not _wired(g, n):
        return None
    return _sized(g, pre, tail, n)


def _wired(g: Graph, n: dict[str, Node]) -> bool:
    """Ops and edges of the pattern, and no reader outside it of a value the fold changes."""
    ids, logits = n["ffn_moe_topk"].name, n["ffn_moe_topk"].inputs[0]
    x = n["ffn_gate_exps"].inputs[0]

    def is_(role: str, op: Op, *inputs: str) -> bool:
        return n[role].op == op and n[role].inputs == inputs

    def either(role: str, op: Op, a: str, b: str) -> bool:
        return is_(role, op, a, b) or is_(role, op, b, a)

    nm = {r: v.name for r, v in n.items()}
    ok = (is_("ffn_moe_weights", Op.MOE_WEIGHTS, logits, ids) and g[x].spec.rank == 2
          and n["ffn_gate_exps"].op == Op.MOE_MATMUL and n["ffn_gate_exps"].inputs[2] == ids
          and n["ffn_up_exps"].op == Op.MOE_MATMUL and n["ffn_up_exps"].inputs[0] == x
          and n["ffn_up_exps"].inputs[2] == ids
          and is_("ffn_moe_swiglu", Op.SWIGLU, nm["ffn_gate_exps"], nm["ffn_up_exps"])
          and n["ffn_down_exps"].op == Op.MOE_MATMUL
          and n["ffn_down_exps"].inputs[0::2] == (nm["ffn_moe_swiglu"], ids)
          and is_("ffn_moe_out", Op.MOE_SUM, nm["ffn_down_exps"], nm["ffn_moe_weights"])
          and n["ffn_gate_shexp"].op == Op.MATMUL and n["ffn_gate_shexp"].inputs[0] == x
          and n["ffn_up_shexp"].op == Op.MATMUL and n["ffn_up_shexp"].inputs[0] == x
          and is_("ffn_swiglu_shexp", Op.SWIGLU, nm["ffn_gate_shexp"], nm["ffn_up_shexp"])
          and n["ffn_down_shexp"].op == Op.MATMUL and n["ffn_down_shexp"].inputs[0] == nm["ffn_swiglu_shexp"]
          and n["ffn_gate_inp_shexp"].op == Op.MATMUL
          and is_("ffn_shexp_sig", Op.SIGMOID, nm["ffn_gate_inp_shexp"])
          and either("ffn_shexp_gated", Op.MUL, nm["ffn_down_shexp"], nm["ffn_shexp_sig"])
          and either("ffn_moe_shexp", Op.ADD, nm["ffn_moe_out"], nm["ffn_shexp_gated"])
          and n["ffn_moe_shexp"].spec == n["ffn_moe_out"].spec)  # its readers read moe_out instead
    if not ok:
        return False
    # the values that change or disappear are read only inside the pattern
    inside = set(nm.values())
    users = g.users
    changed = [r for r in ("ffn_moe_topk", "ffn_moe_weights", "ffn_moe_out", *GROWN, *GONE) if r != "ffn_moe_shexp"]
    return all(set(users.get(nm[r], ())) <= inside for r in changed)


def _sized(g: Graph, pre: str, tail: str, n: dict[str, Node]) -> _Match | None:
    """Weights: routed [E,N,H] / [E,H,N], shared [S,H] / [H,S] with S = m*N, one storage type."""
    ws = {r: _weight_leaf(g, n[r], 1) for r in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                                                "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")}
    if any(w is None for w in ws.values()):
        return None
    w: dict[str, Node] = ws  # type: ignore[assignment]
    shapes = {r: w[r].spec.shape for r in w}
    if not all(isinstance(d, int) for s in shapes.values() for d in s):
        return None
    E, N, H = shapes["ffn_gate_exps"]
    S = shapes["ffn_gate_shexp"][0]
    if (shapes["ffn_up_exps"] != (E, N, H) or shapes["ffn_down_exps"] != (E, H, N)
            or shapes["ffn_gate_shexp"] != (S, H) or shapes["ffn_up_shexp"] != (S, H)
            or shapes["ffn_down_shexp"] != (H, S) or S % N):
        return None
    m = S // N
    dt = w["ffn_gate_exps"].spec.dtype
    if any(x.spec.dtype != dt for x in w.values()):
        return None  # a concat cannot mix storage types
    if m > 1 and N % dt.block_size:
        return None  # the shared down weight is cut along its columns: on quant block bounds only
    gate = n["ffn_gate_inp_shexp"]
    if gate.spec.rank != 2 or gate.spec.shape[1] != 1:
        return None
    # ffn_gate_inp_shexp moves up to before moe_weights (its new reader): its inputs must allow it
    pos = {x.name: k for k, x in enumerate(g.nodes)}
    if any(g[i].op != Op.WEIGHT and pos[i] > pos[n["ffn_moe_topk"].name] for i in gate.inputs):
        return None
    leaves = tuple(dict.fromkeys([*(x.name for x in w.values()),
                                  *(i for i in gate.inputs if g[i].op == Op.WEIGHT)]))
    return _Match(pre, tail, m, n, leaves)


def _new_name(weight: str, tag: str) -> str:
    """`blk.3.ffn_gate_exps.weight#1` + `sh` -> `blk.3.ffn_gate_exps.weight.sh#1`."""
    base, sfx = base_name(weight)
    return f"{base}.{tag}{sfx}"


def _emit_weights(em: Emitter, g: Graph, mt: _Match) -> dict[str, str]:
    """The [E+m,...] expert weights: routed experts first, then the shared expert's m pieces."""
    n, m, dev = mt.nodes, mt.m, mt.nodes["ffn_moe_topk"].device
    out: dict[str, str] = {}
    for routed, shared in (("ffn_gate_exps", "ffn_gate_shexp"), ("ffn_up_exps", "ffn_up_shexp")):
        we, ws = n[routed].inputs[1], n[shared].inputs[1]
        _, N, H = g[we].spec.shape
        # [S,H] -> [m,N,H]: rows p*N..(p+1)*N are the p-th slot's intermediate columns
        piece = em.emit(_new_name(ws, "exps"), Op.RESHAPE, [ws], {"shape": (m, N, H)}, dev)
        out[routed] = em.emit(_new_name(we, "sh"), Op.CONCAT, [we, piece], {"dim": 0}, dev)
    we, ws = n["ffn_down_exps"].inputs[1], n["ffn_down_shexp"].inputs[1]
    _, H, N = g[we].spec.shape
    # [H,S] -> m pieces [1,H,N] (a reshape to [H,m,N] would put H first): one column block each
    pieces = []
    for p in range(m):
        cols = ws if m == 1 else em.emit(_new_name(ws, f"cols{p}"), Op.SLICE, [ws],
                                         {"dim": 1, "start": p * N, "stop": (p + 1) * N}, dev)
        pieces.append(em.emit(_new_name(ws, f"exp{p}"), Op.RESHAPE, [cols], {"shape": (1, H, N)}, dev))
    out["ffn_down_exps"] = em.emit(_new_name(we, "sh"), Op.CONCAT, [we, *pieces], {"dim": 0}, dev)
    return out


def fold_shared_expert(g: Graph) -> Graph:
    """Every layer's sigmoid-gated shared expert as m = S/N extra expert slots of its MoE
    kernels (per device after placement); other layers and graphs unchanged."""
    matches = {mt.name("ffn_moe_topk"): mt for mt in (_match(g, x) for x in g.nodes if x.op == Op.MOE_TOPK) if mt}
    if not matches:
        return g
    gone = {mt.name(r) for mt in matches.values() for r in GONE}
    gates = {mt.name("ffn_gate_inp_shexp") for mt in matches.values()}
    rename = {mt.name("ffn_moe_shexp"): mt.name("ffn_moe_out") for mt in matches.values()}
    regrow: dict[str, tuple[_Match, str]] = {mt.name(r): (mt, r) for mt in matches.values()
                                             for r in ("ffn_moe_weights", *GROWN)}
    hoisted: set[str] = set()
    em = Emitter()
    weights: dict[str, dict[str, str]] = {}  # topk name -> role -> new weight
    for x in g.nodes:
        if x.name in gone or x.name in gates or x.name in hoisted:
            continue
        if x.name in matches:
            mt = matches[x.name]
            for leaf in mt.leaves:  # leaves defined later in the layer move up: leaves have no inputs
                if leaf not in em:
                    em.add(g[leaf])
                    hoisted.add(leaf)
            weights[x.name] = _emit_weights(em, g, mt)
            gate = mt.nodes["ffn_gate_inp_shexp"]
            em.emit(gate.name, gate.op, gate.inputs, gate.attrs, gate.device)  # now read by moe_weights
            em.emit(x.name, Op.MOE_TOPK, x.inputs, {**x.attr, "shared": mt.m}, x.device)
        elif x.name in regrow:
            mt, role = regrow[x.name]
            ins, attrs = list(x.inputs), dict(x.attr)
            if role == "ffn_moe_weights":
                ins.append(mt.name("ffn_gate_inp_shexp"))
                attrs["shared"] = mt.m
            elif x.op == Op.MOE_MATMUL:
                ins[1] = weights[mt.name("ffn_moe_topk")][role]
            em.emit(x.name, x.op, ins, attrs, x.device)
        elif any(i in rename for i in x.inputs):
            em.add(x.with_(inputs=tuple(rename.get(i, i) for i in x.inputs)))
        else:
            em.add(x)
    return Graph(tuple(em.nodes), g.meta)
