"""Statistics read off a built graph (never from a separate formula that could drift).

Parameter counts are sums over weight leaves; bytes use each leaf's storage type; KV and
recurrent sizes come from the state inputs; FLOPs from the matmul-like nodes with the
symbols bound. `params_active` counts routed-expert tensors at k/E of their size (the
fraction one token uses) and everything else in full, embeddings included, as model cards do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from graphir.graph import Graph, Node
from graphir.ops import Op


@dataclass(frozen=True)
class ModelStats:
    params_total: int
    params_active: int
    weight_bytes: int
    kv_bytes_per_token: int  # caches of full-attention layers
    recurrent_bytes_per_seq: int
    flops_per_token: int  # one decoded token at `depth`
    depth: int
    quant: str
    kv_type: str
    window_kv_bytes: int = 0  # caches of sliding-window layers, at their window (per sequence)

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _numel(n: Node) -> int:
    return n.spec.numel_at({"T": 1, "KV": 1})


def _is_routed_expert(n: Node) -> bool:
    return n.name.split("#")[0].endswith(("_exps.weight",))


def node_flops(g: Graph, n: Node, env: dict[str, int]) -> int:
    """Useful FLOPs of one node (2 per multiply-add), symbols bound by `env`."""
    ins = [g[i].spec for i in n.inputs]
    if n.op == Op.MATMUL:
        rows = ins[0].numel_at(env) // max(1, ins[0].bind(env)[-1])
        out, k = ins[1].bind(env)
        return 2 * rows * out * k
    if n.op in (Op.MOE_MATMUL, Op.SWIGLU_MOE_MATMUL, Op.MOE_MATMUL_ROUTED):
        t, kk, out = n.spec.bind(env)
        w = ins[2] if n.op == Op.MOE_MATMUL_ROUTED else ins[-2]  # the weight: the input before the ids
        return 2 * t * kk * out * w.bind(env)[2]
    if n.op == Op.HEAD_MATMUL:  # one [out,in] matrix per head
        t, h, out = n.spec.bind(env)
        return 2 * t * h * out * ins[1].bind(env)[2]
    if n.op == Op.ATTENTION:
        t, hq, dv = n.spec.bind(env)
        s, _, d = ins[1].bind(env)
        # causal: query i sees s - t + i + 1 keys (at most `window` of them in a sliding layer)
        w = n.attr.get("window")
        seen = t * (s - t) + t * (t + 1) // 2 if w is None else sum(min(s - t + i + 1, int(w)) for i in range(t))
        return 2 * hq * seen * (d + dv)
    if n.op == Op.DELTA_NET:
        t, nk, dk = ins[0].bind(env)
        _, nv, dv = ins[2].bind(env)
        # per token and value head: decay, k^T S, update, q^T S (each ~2*dk*dv)
        return 8 * t * nv * dk * dv
    if n.op in (Op.SSM_CONV, Op.SSM_CONV_STEP):  # the weight [C,K] last
        t, c = n.spec.bind(env)
        return 2 * t * c * ins[-1].bind(env)[1]
    return 0


def graph_stats(g: Graph, depth: int = 0) -> ModelStats:
    """Statistics of an unplaced graph; `depth` is the cache length for flops_per_token."""
    weights = [n for n in g.nodes if n.op == Op.WEIGHT]
    total = sum(_numel(n) for n in weights)
    moe_frac = 1.0
    for n in g.nodes:
        if n.op in (Op.MOE_TOPK, Op.MOE_TOPK_BIAS, Op.MOE_TOPK_BIASED):
            moe_frac = n.attr["k"] / g[n.inputs[0]].spec.bind({"T": 1})[1]
            break
    active = sum(int(_numel(n) * (moe_frac if _is_routed_expert(n) else 1.0)) for n in weights)
    wbytes = sum(n.spec.nbytes_at({}) for n in weights)
    states = [n for n in g.nodes if n.op == Op.STATE_IN]
    win = cache_windows(g)
    kv = sum(n.spec.nbytes_at({"KV": 1}) for n in states if "KV" in str(n.spec.shape[0]) and n.name not in win)
    rec = sum(n.spec.nbytes_at({}) for n in states if "KV" not in str(n.spec.shape[0]))
    env = {"T": 1, "KV": depth}
    flops = sum(node_flops(g, n, env) for n in g.nodes)
    return ModelStats(total, active, wbytes, kv, rec, flops, depth, str(g.info.get("quant", "")),
                      str(g.info.get("kv_type", "")), sum(g[s].spec.nbytes_at({"KV": w}) for s, w in win.items()))


def cache_windows(g: Graph) -> dict[str, int]:
    """State leaves (by node name) that a sliding-window attention reads -> its window: such a
    cache needs the window's rows, not the context's."""
    out: dict[str, int] = {}
    for n in g.by_op(Op.ATTENTION):
        if "window" not in n.attr:
            continue
        for name in n.inputs[1:3]:
            src = g[name]
            while src.inputs and src.op in (Op.COPY, Op.KV_APPEND, Op.RESHAPE, Op.SLICE):
                src = g[src.inputs[0]]
            if src.op == Op.STATE_IN:
                out[src.name] = int(n.attr["window"])
    return out
