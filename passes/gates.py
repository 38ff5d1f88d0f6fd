"""`fuse_delta_net_gates`: the gated delta-net's decay and write gates made inside its kernel.

A gated delta-net layer makes its per-head gates from two small projections, in five nodes:

    %blk.0.ssm_alpha_f32 = cast(%blk.0.ssm_alpha) {dtype=f32}
    %blk.0.ssm_g = mul(softplus(add(%blk.0.ssm_alpha_f32, %blk.0.ssm_dt.bias)), %blk.0.ssm_a)
    %blk.0.ssm_beta = sigmoid(%blk.0.ssm_b)

Each is a kernel of a few dozen values: in a decode step, five launches per layer for nothing
the recurrent kernel could not do as it reads the gates. This pass hands the delta_net the
projections and the two per-head vectors instead (`raw_gates`):

    %blk.0.delta_net = delta_net(q, k, v, %blk.0.ssm_alpha, %blk.0.ssm_b, %blk.0.ssm_state,
                                 %blk.0.ssm_dt.bias, %blk.0.ssm_a) {qk_l2norm=true, raw_gates=true}

with the same meaning (the reference kernel runs the same torch ops). The chain must be
exactly that, each intermediate read only by the next and on the delta_net's device; anything
else is left as it is. Runs after placement (each device's piece of a split layer has its own
chain).
"""

from __future__ import annotations

from graphir.graph import Graph, Node
from graphir.ops import Op

from passes.emit import Emitter


def fuse_delta_net_gates(g: Graph) -> Graph:
    """delta_net(q, k, v, g, beta, state) -> delta_net(q, k, v, alpha, b, state, dt_bias, a) {raw_gates}."""
    plans: dict[str, tuple[list[str], set[str]]] = {}
    for n in g.by_op(Op.DELTA_NET):
        if len(n.inputs) == 6:
            got = _chain(g, n)
            if got is not None:
                plans[n.name] = got
    if not plans:
        return g
    gone = set().union(*(chain for _, chain in plans.values()))
    em = Emitter()
    for n in g.nodes:
        if n.name in plans:
            ins, _ = plans[n.name]
            attrs = dict(n.attrs)
            attrs["raw_gates"] = True
            em.emit(n.name, Op.DELTA_NET, ins, attrs, n.device)
        elif n.name not in gone:
            em.add(n)
    return Graph(tuple(em.nodes), g.meta)


def _chain(g: Graph, dn: Node) -> tuple[list[str], set[str]] | None:
    """(the fused delta_net's inputs, the chain nodes it replaces), or None if g's gates are
    not the softplus/sigmoid chain."""
    q, k, v, gate, beta, state = dn.inputs

    def only(name: str, op: Op, reader: str) -> Node | None:
        n = g[name]
        ok = n.op == op and n.device == dn.device and g.users.get(name) == (reader,)
        return n if ok else None

    mul = only(gate, Op.MUL, dn.name)
    sig = only(beta, Op.SIGMOID, dn.name)
    if mul is None or sig is None:
        return None
    nv = dn.spec.shape[1]
    for sp_name, a_name in (mul.inputs, mul.inputs[::-1]):
        sp = only(sp_name, Op.SOFTPLUS, mul.name)
        if sp is None or not _per_head(g[a_name], nv):
            continue
        add = only(sp.inputs[0], Op.ADD, sp.name)
        if add is None:
            return None
        for x_name, bias_name in (add.inputs, add.inputs[::-1]):
            if not _per_head(g[bias_name], nv) or g[x_name].spec.rank != 2:
                continue
            chain = {mul.name, sig.name, sp.name, add.name}
            cast = only(x_name, Op.CAST, add.name)
            if cast is not None and str(cast.attr["dtype"]) == "f32":
                chain.add(cast.name)
                alpha = cast.inputs[0]
            elif g[x_name].spec.dtype.name == "f32":
                alpha = x_name
            else:
                continue
            return [q, k, v, alpha, sig.inputs[0], state, bias_name, a_name], chain
    return None


def _per_head(n: Node, nv: object) -> bool:
    return n.spec.rank == 1 and n.spec.shape[0] == nv
