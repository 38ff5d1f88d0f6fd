"""Kernel fusions as graph passes: a pattern of nodes becomes one fused op of the table.

Each pass finds its pattern in the graph and emits the fused node (graphir/ops_fused.py has
their rules) where the first node of the pattern was; the values the pattern made keep their
names, now `result` views of the fused node (or the fused node itself when it has one
result), so readers elsewhere are untouched. A weight leaf the fused node reads is moved up
to it. The graphir-cuda engine lists these passes (cli/run.py DEFAULT_PASSES and its
engine profile), so the graph the executor runs is the graph the cost model prices.

Decode-only fusions (`phase="tg"`) are those whose kernels are written for one token: the
residual add with the next norm, the expert sum with both, a cast rounded by the gated norm
as it loads, the swiglu applied by the expert GEMV, the router top-k writing the shared
expert's weight, and conv / delta-net state updated in place. The top-k writing the routing
weights (no shared expert) runs in both phases; the expert route shared by a layer's expert
matmuls (one sort of the slots by expert) is a prefill one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphir.graph import Graph, Node
from graphir.ops import LEAVES, Op, infer_results

# the expert GEMV applies a swiglu for up to this many slots (T*k) of one decode step; a
# larger batch runs the grouped GEMM, which reads a made x (backends/cuda/triton_kernels/fast_moe.DECODE_SLOTS)
GEMV_SLOTS = 64
NARROW_FLOATS = ("bf16", "f16")


@dataclass
class Rewrite:
    """Nodes to emit in place of named nodes, and nodes to drop; `apply` rebuilds the graph
    in program order, moving a weight leaf up to the first node that now reads it."""

    g: Graph
    at: dict[str, list[Node]] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    made: dict[str, Node] = field(default_factory=dict)  # new nodes, by name

    def fused(self, name: str, op: Op, inputs: tuple[str, ...], attrs: dict[str, Any], like: Node) -> Node:
        """A node of `op` on `like`'s device, its specs inferred from the inputs (nodes of g or made here)."""
        specs = infer_results(op, [(self.made.get(i) or self.g[i]).results for i in inputs], attrs)
        return self._made(Node(name, op, inputs, specs[0], tuple(attrs.items()), like.device, specs[1:]))

    def result(self, of: Node, k: int, like: Node | None = None, name: str = "") -> Node:
        """Result k of fused node `of`, as `like`'s value (its name and spec) or a new `name`."""
        return self._made(Node(like.name if like else name, Op.RESULT, (of.name,), of.results[k], (("index", k),),
                               of.device))

    def _made(self, n: Node) -> Node:
        self.made[n.name] = n
        return n

    def apply(self) -> Graph:
        if not self.at and not self.drop:
            return self.g
        out: list[Node] = []
        done: set[str] = set()
        for n in self.g.nodes:
            if n.name in self.drop or n.name in done:
                continue
            for m in self.at.get(n.name, [n]):
                for i in m.inputs:  # a weight read earlier than it was defined: move it up
                    if i not in done and i in self.g and self.g[i].op in LEAVES:
                        out.append(self.g[i])
                        done.add(i)
                out.append(m)
                done.add(m.name)
        return self.g.replace_nodes(out)


def phase(g: Graph) -> str:
    return str(g.info.get("phase", "pp"))


def _only_reader(g: Graph, n: Node, op: Op, arg: int | None = None) -> Node | None:
    """The single node reading n, when it is an `op` on n's device (reading n as input `arg`, once)."""
    users = g.users.get(n.name, ())
    if len(users) != 1:
        return None
    u = g[users[0]]
    if u.op != op or u.device != n.device or u.inputs.count(n.name) != 1:
        return None
    return u if arg is None or u.inputs[arg] == n.name else None


def _name(g: Graph, base: str) -> str:
    name, k = base, 1
    while name in g:
        name, k = f"{base}.{k}", k + 1
    return name


def _norm_after(g: Graph, add: Node) -> Node | None:
    """The rms_norm of a weight leaf reading residual add `add` as x, on its device."""
    for u in g.users.get(add.name, ()):
        m = g[u]
        if (m.op == Op.RMS_NORM and m.inputs[0] == add.name and m.device == add.device
                and g[m.inputs[1]].op == Op.WEIGHT and m.spec == add.spec):
            return m
    return None


def fuse_add_rms_norm(g: Graph) -> Graph:
    """Decode: residual add + the rms_norm reading it in one op (with the expert sum before it).

    add_rms_norm; when the add's other operand is an expert sum read by it alone, sum, add and
    norm as one moe_sum_add_rms_norm."""
    if phase(g) != "tg":
        return g
    rw = Rewrite(g)
    for n in g.by_op(Op.ADD):
        norm = _norm_after(g, n)
        a, b = (g[i] for i in n.inputs)
        if norm is None or a.spec != b.spec or a.spec.rank != 2 or a.outs or b.outs:
            continue
        w = norm.inputs[1]
        s = next((x for x in (b, a) if x.op == Op.MOE_SUM and _only_reader(g, x, Op.ADD) == n), None)
        if s is not None and g[s.inputs[0]].spec.rank == 3:
            other = a if s is b else b  # a + sum == sum + a: the operand order does not change a sum
            f = rw.fused(_name(g, n.name + ".moe_add_norm"), Op.MOE_SUM_ADD_RMS_NORM,
                         (other.name, *s.inputs, w), dict(norm.attr), n)
            rw.drop.add(s.name)  # read by the add alone: the fused node at the add makes it
        else:
            f = rw.fused(_name(g, n.name + ".add_norm"), Op.ADD_RMS_NORM, (*n.inputs, w), dict(norm.attr), n)
        rw.at[n.name] = [f, rw.result(f, 0, n)]
        rw.at[norm.name] = [rw.result(f, 1, norm)]
    return rw.apply()


def fuse_topk_weights(g: Graph) -> Graph:
    """Router top-k and its routing weights in one op (decode: the shared expert's gate too).

    moe_topk_weights in both phases; with a folded shared expert (decode only) the top-k also
    reads the shared gate, when the gate is made before it."""
    rw = Rewrite(g)
    pos = {n.name: k for k, n in enumerate(g.nodes)}
    for t in g.by_op(Op.MOE_TOPK):
        m = int(t.attr.get("shared", 0))
        for u in g.users.get(t.name, ()):
            w = g[u]
            if (w.op != Op.MOE_WEIGHTS or not w.attr.get("norm") or int(w.attr.get("shared", 0)) != m
                    or w.inputs[:2] != (t.inputs[0], t.name) or w.device != t.device):
                continue
            if m and (phase(g) != "tg" or len(w.inputs) != 3 or pos[w.inputs[2]] > pos[t.name]):
                continue
            f = rw.fused(_name(g, t.name + ".weights"), Op.MOE_TOPK_WEIGHTS, (t.inputs[0], *w.inputs[2:]),
                         dict(t.attr), t)
            rw.at[t.name] = [f, rw.result(f, 0, t)]
            rw.at[w.name] = [rw.result(f, 1, w)]
            break
    return rw.apply()


def fuse_cast_norm(g: Graph) -> Graph:
    """Decode: a cast to bf16/f16 rounded by the gated norm that reads it (cast_rms_norm_gated)."""
    if phase(g) != "tg":
        return g
    rw = Rewrite(g)
    for c in g.by_op(Op.CAST):
        norm = _only_reader(g, c, Op.RMS_NORM_GATED, 0)
        src = g[c.inputs[0]]
        if (norm is None or src.name in norm.inputs[1:] or src.spec.dtype.name != "f32"
                or c.spec.dtype.name not in NARROW_FLOATS):
            continue
        rw.at[norm.name] = [rw.fused(norm.name, Op.CAST_RMS_NORM_GATED, (src.name, *norm.inputs[1:]),
                                     {**norm.attr, "dtype": c.spec.dtype.name}, norm)]
        rw.drop.add(c.name)
    return rw.apply()


def fuse_swiglu_gemv(g: Graph) -> Graph:
    """Decode: the swiglu applied by the expert GEMV that reads it (swiglu_moe_matmul).

    For up to GEMV_SLOTS slots, a swiglu read only by an expert matmul as its x."""
    if phase(g) != "tg":
        return g
    rw = Rewrite(g)
    for s in g.by_op(Op.SWIGLU):
        mm = _only_reader(g, s, Op.MOE_MATMUL, 0)
        if mm is None or s.spec.rank != 3:
            continue
        slots = g[mm.inputs[2]].spec.shape
        if not all(isinstance(d, int) for d in slots) or slots[0] * slots[1] > GEMV_SLOTS:
            continue
        rw.at[mm.name] = [rw.fused(mm.name, Op.SWIGLU_MOE_MATMUL, (*s.inputs, *mm.inputs[1:]), {}, mm)]
        rw.drop.add(s.name)
    return rw.apply()


def _state_output(g: Graph, n: Node, key: str) -> bool:
    """Whether n is read by nothing but the output of state `key`."""
    users = [g[u] for u in g.users.get(n.name, ())]
    return len(users) == 1 and users[0].op == Op.OUTPUT and users[0].attr["key"] == key


def conv_in_place(g: Graph) -> Graph:
    """Decode: the conv state shifted in place by one ssm_conv_step (no concat, no copy).

    ssm_conv(concat(S, x)) whose concat rows [1:] only go back to state S (up to 4 taps)."""
    if phase(g) != "tg":
        return g
    rw = Rewrite(g)
    pos = {n.name: k for k, n in enumerate(g.nodes)}
    for n in g.by_op(Op.SSM_CONV):
        cat, w = g[n.inputs[0]], g[n.inputs[1]]
        if cat.op != Op.CONCAT or cat.attr["dim"] != 0 or len(cat.inputs) != 2 or not 2 <= w.spec.shape[1] <= 4:
            continue
        src, x = g[cat.inputs[0]], g[cat.inputs[1]]
        if (src.op != Op.STATE_IN or g.users.get(src.name) != (cat.name,) or x.spec.shape[0] != 1
                or src.spec.dtype != x.spec.dtype):
            continue
        others = [g[u] for u in g.users.get(cat.name, ()) if u != n.name]
        if (len(others) != 1 or others[0].op != Op.SLICE or others[0].attr["start"] != 1
                or not _state_output(g, others[0], str(src.attr["state"]))):
            continue
        if w.op not in LEAVES and pos[w.name] > pos[cat.name]:
            continue  # the weight is made after the concat: the fused node cannot sit there
        f = rw.fused(_name(g, n.name + ".step"), Op.SSM_CONV_STEP, (src.name, x.name, w.name),
                     {**n.attr, "in_place": True}, n)
        rw.at[cat.name] = [f]
        rw.at[others[0].name] = [rw.result(f, 1, others[0])]
        rw.at[n.name] = [rw.result(f, 0, n)]
    return rw.apply()


def delta_net_in_place(g: Graph) -> Graph:
    """Decode: the delta-net state written over itself (in_place; two results).

    A delta_net whose new state only goes back to the state it read: the output rows and the
    state as two results, the state in its own memory (no copy)."""
    if phase(g) != "tg":
        return g
    rw = Rewrite(g)
    for n in g.by_op(Op.DELTA_NET):
        src = g[n.inputs[5]]
        if n.attr.get("in_place") or src.op != Op.STATE_IN or g.users.get(src.name) != (n.name,):
            continue  # another reader would see the state after the kernel overwrote it
        T = n.spec.shape[0] - src.spec.shape[0] if isinstance(n.spec.shape[0], int) else None
        users = [g[u] for u in g.users.get(n.name, ())]
        rows = [u for u in users if u.op == Op.SLICE and u.attr["dim"] == 0 and u.attr["start"] == 0
                and u.attr["stop"] == T]
        state = [u for u in users if u not in rows]
        if (T is None or len(state) != 1 or state[0].op != Op.SLICE or state[0].attr["dim"] != 0
                or state[0].attr["start"] != T or not _state_output(g, state[0], str(src.attr["state"]))):
            continue
        f = rw.fused(n.name, Op.DELTA_NET, n.inputs, {**n.attr, "in_place": True}, n)
        rw.at[n.name] = [f]
        for r in rows:
            rw.at[r.name] = [rw.result(f, 0, r)]
        rw.at[state[0].name] = [rw.result(f, 1, state[0])]
    return rw.apply()


def share_moe_route(g: Graph) -> Graph:
    """Prefill: the expert matmuls over one ids read one moe_route (slots sorted by expert once).

    The gate/up and down matmuls of a layer group the same slots by expert; moe_route sorts
    them once, before the first of them, and each becomes a moe_matmul_routed reading it."""
    if phase(g) != "pp":
        return g
    rw = Rewrite(g)
    groups: dict[tuple[str, int, str | None], list[Node]] = {}
    for mm in g.by_op(Op.MOE_MATMUL):
        groups.setdefault((mm.inputs[2], int(g[mm.inputs[1]].spec.shape[0]), mm.device), []).append(mm)
    for (ids, E, _), mms in groups.items():
        route = rw.fused(_name(g, ids + ".route"), Op.MOE_ROUTE, (ids,), {"experts": E}, mms[0])
        views = [rw.result(route, k, name=_name(g, f"{route.name}.{part}")) for k, part in enumerate(("order", "ends"))]
        first, *rest = mms
        rw.at[first.name] = [route, *views, rw.fused(first.name, Op.MOE_MATMUL_ROUTED,
                                                     (*first.inputs, *(v.name for v in views)), {}, first)]
        for mm in rest:
            rw.at[mm.name] = [rw.fused(mm.name, Op.MOE_MATMUL_ROUTED, (*mm.inputs, *(v.name for v in views)), {}, mm)]
    return rw.apply()


# the engine's order: routing first (the sum fusion reads the weights' new producer by name)
FUSIONS: tuple[str, ...] = ("fuse_topk_weights", "fuse_swiglu_gemv", "fuse_cast_norm", "fuse_add_rms_norm",
                            "conv_in_place", "delta_net_in_place", "share_moe_route")
