"""Per-op cost rules: `RULES: dict[Op, rule]`, one rule per member of graphir.ops.Op.

A rule looks at one node with its symbols bound (T tokens, KV cached tokens) and returns the
*work* it does, independent of any hardware: flops, bytes it moves (split into weight bytes at
their storage type, KV-cache bytes at the cache type, and activation/recurrent-state bytes),
kernel launches, and for matmuls the problem shape that decides GEMM efficiency. Turning work
into seconds is the engine's and GPU's business (costing.py), so a graph is priced once.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

from graphir.graph import Node
from graphir.ops import DEFS, Op


class Work(NamedTuple):
    kind: str  # gemm | attn | recurrent | vector | copy | allreduce | free
    flops: float = 0.0
    wbytes: float = 0.0  # weights read, at their storage type
    kvbytes: float = 0.0  # KV cache read or written, at the cache type
    actbytes: float = 0.0  # activations and recurrent state read + written
    launches: int = 0
    m: float = 0.0  # gemm: tokens per matmul instance (per expert for MoE)
    n: float = 0.0  # gemm: output rows
    k: float = 0.0  # gemm: inner size
    wdtype: str = ""  # gemm: storage type of the weight; attention: the KV cache type
    comm_numel: float = 0.0  # transfers: elements moved
    comm_elem: float = 0.0  # bytes per element; 0 = the engine picks (all-reduce partial type)
    tokens: int = 0  # transfers: tokens in the batch (decides reduce algorithm and type)
    kv_cap: float = float("inf")  # cached tokens past which the work stops growing (a sliding window)
    experts: float = 0.0  # expert matmul: experts in the weight (0: not an expert matmul)
    used: float = 0.0  # expert matmul: slots per token (k, shared ones included)
    shared: float = 0.0  # expert matmul: slots every token reads (a folded shared expert)


Rule = Callable[[Node, Sequence[Node], Mapping[str, int]], Work]

# flops per output element of the cheap element-wise ops (exp, rsqrt and the like count a few)
_VEC_FLOPS = {Op.ADD: 1, Op.MUL: 1, Op.SILU: 4, Op.SIGMOID: 4, Op.SOFTPLUS: 4, Op.SWIGLU: 5,
              Op.SWIGLU_OAI: 9, Op.ADD_ID: 1, Op.GEGLU: 8, Op.SOFTCAP: 4,
              Op.CAST: 1, Op.ROPE: 6, Op.RMS_NORM: 4, Op.RMS_NORM_GATED: 8, Op.RMS_NORM_PLAIN: 3, Op.CONCAT: 0,
              Op.GET_ROWS: 0, Op.MOE_WEIGHTS: 4, Op.MOE_SUM: 2, Op.ATTN_TEMP: 1, Op.MOE_WEIGHTS_SIGMOID: 4,
              Op.ADD_RMS_NORM: 5, Op.CAST_RMS_NORM_GATED: 9}


def _nb(n: Node, env: Mapping[str, int]) -> float:
    return float(n.spec.nbytes_at(env))


def _out(n: Node, env: Mapping[str, int]) -> float:
    """Bytes a node writes: every result (a fused op may have several)."""
    return sum(float(r.nbytes_at(env)) for r in n.results)


def _split_bytes(ins: Sequence[Node], env: Mapping[str, int]) -> tuple[float, float]:
    """(weight bytes, other bytes) read from `ins`."""
    w = a = 0.0
    for i in ins:
        if i.op == Op.WEIGHT:
            w += _nb(i, env)
        else:
            a += _nb(i, env)
    return w, a


def _free(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    return Work("free")


def _vector(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    w, a = _split_bytes(ins, env)
    out = n.spec.numel_at(env)
    return Work("vector", flops=float(_VEC_FLOPS.get(n.op, 2) * out), wbytes=w, actbytes=a + _out(n, env),
                launches=DEFS[n.op].launches)


def _get_rows(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    table, ids = ins
    rows = n.spec.bind(env)[0]
    row_bytes = table.spec.dtype.nbytes(table.spec.bind(env)[-1])
    return Work("vector", wbytes=float(rows * row_bytes), actbytes=_nb(ids, env) + _nb(n, env), launches=1)


def _add_id(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    y, b, ids = ins  # only the chosen experts' bias rows are read
    rows = ids.spec.numel_at(env)
    row_bytes = b.spec.dtype.nbytes(b.spec.bind(env)[-1])
    return Work("vector", flops=float(n.spec.numel_at(env)), wbytes=float(min(rows, b.spec.bind(env)[0]) * row_bytes),
                actbytes=_nb(y, env) + _nb(ids, env) + _nb(n, env), launches=1)


def _kv_append(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    cache, new = ins
    rows = new.spec.bind(env)[0]  # only the new rows are written; the cache is updated in place
    heads = 1
    for d in new.spec.bind(env)[1:-1]:
        heads *= d
    per_row = heads * cache.spec.dtype.nbytes(new.spec.bind(env)[-1])
    return Work("vector", kvbytes=float(rows * per_row), actbytes=_nb(new, env), launches=1)


def _matmul(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    x, w = ins
    out_f, in_f = w.spec.bind(env)
    m = x.spec.numel_at(env) // in_f
    wb = _nb(w, env) if w.op == Op.WEIGHT else 0.0
    ab = _nb(x, env) + _nb(n, env) + (0.0 if w.op == Op.WEIGHT else _nb(w, env))
    return Work("gemm", flops=2.0 * m * out_f * in_f, wbytes=wb, actbytes=ab, launches=1,
                m=float(m), n=float(out_f), k=float(in_f), wdtype=w.spec.dtype.name)


def distinct_experts(n_expert: int, k: int, tokens: int) -> float:
    """Expected experts hit by `tokens` tokens routing to k of E each: E(1 - (1 - k/E)^T)."""
    return n_expert * (1.0 - (1.0 - k / n_expert) ** tokens)


def _moe_matmul(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    x, w, ids = ins
    E, out_f, in_f = w.spec.bind(env)
    T, k = ids.spec.bind(env)
    # a folded shared expert (moe_topk {shared=m}) is m slots every token reads, not routed ones
    m = int(ids.attr.get("shared", 0)) if ids.op in (Op.MOE_TOPK, Op.MOE_TOPK_WEIGHTS) else 0
    used = m + distinct_experts(E - m, k - m, T)  # in TG only the k routed experts' slices are read
    wb = _nb(w, env) * used / E
    ab = _nb(x, env) * (k if x.spec.rank == 2 else 1) + _nb(n, env) + _nb(ids, env)  # gathered rows
    return Work("gemm", flops=2.0 * T * k * out_f * in_f, wbytes=wb, actbytes=ab, launches=1,
                m=T * k / used, n=float(out_f), k=float(in_f), wdtype=w.spec.dtype.name,
                experts=float(E), used=float(k), shared=float(m))


def _head_matmul(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    x, w = ins  # one [out,in] matrix per head, all read once
    T, h, k = x.spec.bind(env)
    out = w.spec.bind(env)[1]
    return Work("gemm", flops=2.0 * T * h * out * k, wbytes=_nb(w, env), actbytes=_nb(x, env) + _nb(n, env),
                launches=1, m=float(T), n=float(out), k=float(k), wdtype=w.spec.dtype.name)


def _attention(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    q, k, v = ins[:3]
    T, hq, d = q.spec.bind(env)
    keys = k.spec.bind(env)[0]  # KV + T: the cache including this batch
    # causal: query i of the batch sees keys - (T - 1 - i); mean keys per query = keys - (T-1)/2
    seen = keys - (T - 1) / 2.0
    # MLA reads its values out of the latent keys (a view of the same cache): count them once
    kv = _nb(k, env) + (0.0 if v.op == Op.SLICE and v.inputs[0] == k.name else _nb(v, env))
    cap = float("inf")
    window = n.attr.get("window")
    if window is not None:  # a sliding layer reads (and keeps) its window, not the context
        W = int(window)
        seen = min(seen, float(W))
        kv *= min(keys, W + T - 1) / max(keys, 1)
        cap = float(max(W - 1, 0))  # past this many cached tokens the work stops growing
    flops = 4.0 * hq * d * T * seen
    return Work("attn", flops=flops, kvbytes=kv, actbytes=_nb(q, env) + _nb(n, env), launches=1,
                m=float(T), n=float(hq), k=float(d), wdtype=k.spec.dtype.name, kv_cap=cap)


def _delta_net(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    q, k, v, g, beta, s = ins[:6]  # raw_gates: g, beta are the projections (+ two [nv] vectors)
    T, nk, dk = q.spec.bind(env)
    _, nv, dv = v.spec.bind(env)
    # per token and value head: decay + S^T k (2 dk dv), rank-1 update (2 dk dv), output S q (2 dk dv)
    flops = 6.0 * T * nv * dk * dv
    reads = sum(_nb(i, env) for i in (q, k, v, g, beta))
    # the result holds the new state (packed, or in_place: the second result, over the old one)
    return Work("recurrent", flops=flops, actbytes=reads + _nb(s, env) + _out(n, env),
                launches=1, m=float(T), n=float(nv), k=float(dk))


def _ssm_conv(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    x, w = ins
    C, K = w.spec.bind(env)
    T = n.spec.bind(env)[0]
    return Work("vector", flops=2.0 * T * C * K, wbytes=_nb(w, env), actbytes=_nb(x, env) + _nb(n, env),
                launches=1)


def _moe_topk(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    logits = ins[0]  # moe_topk_bias(ed) also read a selection bias [E] (biased: after a sigmoid), a second
    # pass over the logits; moe_topk_weights also writes the chosen weights (and reads the shared gate)
    passes = 2.0 if n.op in (Op.MOE_TOPK_BIAS, Op.MOE_TOPK_BIASED) else 1.0
    wb, ab = _split_bytes(ins, env)
    return Work("vector", flops=4.0 * passes * logits.spec.numel_at(env), wbytes=wb, actbytes=ab + _out(n, env),
                launches=1)


# ---- fused ops: the work of the nodes they replace, without the round trips between them ----

def _moe_sum_add_rms_norm(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    a, y, wk, w = ins
    T, k, H = y.spec.bind(env)
    reads = _nb(a, env) + _nb(y, env) + _nb(wk, env)
    return Work("vector", flops=float(2 * T * k * H + 5 * T * H), wbytes=_nb(w, env), actbytes=reads + _out(n, env),
                launches=1)


def _swiglu_moe_matmul(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    g, u, w, ids = ins  # the expert matmul of swiglu(g, u): reads both halves instead of a made x
    base = _moe_matmul(n, [g, w, ids], env)
    return base._replace(flops=base.flops + 5.0 * g.spec.numel_at(env), actbytes=base.actbytes + _nb(u, env))


def _moe_route(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    # a stable sort of the slots by expert and a search for each expert's group end
    return Work("vector", flops=float(8 * ins[0].spec.numel_at(env)), actbytes=_nb(ins[0], env) + _out(n, env),
                launches=2)


def _moe_matmul_routed(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    base = _moe_matmul(n, ins[:3], env)  # plus the route it reads instead of sorting the slots itself
    return base._replace(actbytes=base.actbytes + _nb(ins[3], env) + _nb(ins[4], env))


def _ssm_conv_step(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    s, x, w = ins  # reads the state and the new row, writes the output and the shifted state
    C, K = w.spec.bind(env)
    T = n.spec.bind(env)[0]
    return Work("vector", flops=2.0 * T * C * K, wbytes=_nb(w, env), actbytes=_nb(s, env) + _nb(x, env) + _out(n, env),
                launches=1)


def _tokens(n: Node, env: Mapping[str, int]) -> int:
    shape = n.spec.bind(env)
    return shape[0] if shape else 1


def _copy(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    return Work("copy", comm_numel=float(n.spec.numel_at(env)),
                comm_elem=_nb(n, env) / max(1, n.spec.numel_at(env)), tokens=_tokens(n, env), launches=1)


def _all_reduce(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    dt = n.attr.get("dtype")
    from graphir.dtypes import dtype  # local: only all-reduces with an explicit type need it

    elem = dtype(dt).nbytes(32) / 32 if dt else 0.0
    # partials sent in another type are cast before and the sum cast back after: two more
    # kernels on every device, which a decode step of small kernels feels (measured on H200s)
    casts = 2 if dt and dt != n.spec.dtype.name else 0
    return Work("allreduce", comm_numel=float(n.spec.numel_at(env)), comm_elem=elem,
                tokens=_tokens(n, env), launches=1 + casts)


RULES: dict[Op, Rule] = {
    Op.INPUT: _free, Op.WEIGHT: _free, Op.STATE_IN: _free, Op.RESHAPE: _free, Op.SLICE: _free,
    Op.OUTPUT: _free,
    Op.GET_ROWS: _get_rows, Op.MATMUL: _matmul, Op.MOE_MATMUL: _moe_matmul,
    Op.RMS_NORM: _vector, Op.RMS_NORM_GATED: _vector, Op.RMS_NORM_PLAIN: _vector, Op.ADD: _vector, Op.MUL: _vector,
    Op.SILU: _vector, Op.SIGMOID: _vector, Op.SOFTPLUS: _vector, Op.SWIGLU: _vector, Op.CAST: _vector,
    Op.SWIGLU_OAI: _vector, Op.ADD_ID: _add_id, Op.GEGLU: _vector, Op.SOFTCAP: _vector,
    Op.ROPE: _vector, Op.ATTN_TEMP: _vector, Op.CONCAT: _vector, Op.MOE_WEIGHTS: _vector, Op.MOE_SUM: _vector,
    Op.ATTENTION: _attention, Op.KV_APPEND: _kv_append, Op.SSM_CONV: _ssm_conv,
    Op.DELTA_NET: _delta_net, Op.MOE_TOPK: _moe_topk, Op.MOE_TOPK_BIAS: _moe_topk,
    Op.MOE_TOPK_BIASED: _moe_topk, Op.MOE_WEIGHTS_SIGMOID: _vector, Op.HEAD_MATMUL: _head_matmul,
    Op.COPY: _copy, Op.ALL_REDUCE: _all_reduce,
    Op.RESULT: _free, Op.ADD_RMS_NORM: _vector, Op.MOE_SUM_ADD_RMS_NORM: _moe_sum_add_rms_norm,
    Op.MOE_TOPK_WEIGHTS: _moe_topk, Op.CAST_RMS_NORM_GATED: _vector, Op.SWIGLU_MOE_MATMUL: _swiglu_moe_matmul,
    Op.SSM_CONV_STEP: _ssm_conv_step, Op.MOE_ROUTE: _moe_route, Op.MOE_MATMUL_ROUTED: _moe_matmul_routed,
}


def work(n: Node, ins: Sequence[Node], env: Mapping[str, int]) -> Work:
    """The work of node `n` (inputs `ins`) with symbols bound by `env`."""
    return RULES[n.op](n, ins, env)
