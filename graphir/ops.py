"""The closed op table: one `OpDef` per op with its arity, attributes and shape/dtype rule.

About one op per kernel launch: fused ops (attention, delta-net, swiglu) are single nodes so
that node counts mean launches to the cost model. Views (`reshape`, `slice`) launch nothing;
`OpDef.launches` says so. Every backend owns a `dict[Op, rule]` and a test asserts each table
covers every member of `Op`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from graphir import dims as D
from graphir.errors import GraphirError
from graphir.dtypes import DType, F32, I32, dtype
from graphir.spec import TensorSpec


class ShapeError(GraphirError):
    """Inputs or attributes an op cannot accept."""


class Op(str, enum.Enum):
    # leaves: their spec is given, not inferred
    INPUT = "input"
    WEIGHT = "weight"
    STATE_IN = "state_in"
    # compute
    GET_ROWS = "get_rows"
    MATMUL = "matmul"
    MOE_MATMUL = "moe_matmul"
    RMS_NORM = "rms_norm"
    RMS_NORM_GATED = "rms_norm_gated"
    ADD = "add"
    MUL = "mul"
    SILU = "silu"
    SIGMOID = "sigmoid"
    SOFTPLUS = "softplus"
    SWIGLU = "swiglu"
    SWIGLU_OAI = "swiglu_oai"
    GEGLU = "geglu"
    SOFTCAP = "softcap"
    CAST = "cast"
    ROPE = "rope"
    ATTN_TEMP = "attn_temp"  # Llama-4 / Mistral-3 per-position query temperature
    ATTENTION = "attention"
    KV_APPEND = "kv_append"
    CONCAT = "concat"
    SSM_CONV = "ssm_conv"
    DELTA_NET = "delta_net"
    MOE_TOPK = "moe_topk"
    MOE_TOPK_BIAS = "moe_topk_bias"  # softmax top-k chosen with a per-expert correction bias (ERNIE 4.5)
    MOE_WEIGHTS = "moe_weights"
    MOE_SUM = "moe_sum"
    MOE_TOPK_BIASED = "moe_topk_biased"
    HEAD_MATMUL = "head_matmul"
    MOE_WEIGHTS_SIGMOID = "moe_weights_sigmoid"
    ADD_ID = "add_id"
    # views (no kernel)
    RESHAPE = "reshape"
    SLICE = "slice"
    # placement
    COPY = "copy"
    ALL_REDUCE = "all_reduce"
    # graph results
    OUTPUT = "output"
    # fusions (passes/fuse*.py) and the view that picks one result of a node with several
    RESULT = "result"
    ADD_RMS_NORM = "add_rms_norm"
    MOE_SUM_ADD_RMS_NORM = "moe_sum_add_rms_norm"
    MOE_TOPK_WEIGHTS = "moe_topk_weights"
    CAST_RMS_NORM_GATED = "cast_rms_norm_gated"
    SWIGLU_MOE_MATMUL = "swiglu_moe_matmul"
    SSM_CONV_STEP = "ssm_conv_step"
    MOE_ROUTE = "moe_route"
    MOE_MATMUL_ROUTED = "moe_matmul_routed"


Results = tuple[TensorSpec, ...]
# a rule returns the node's spec, or for an op with several results the tuple of their specs
Rule = Callable[[Sequence[TensorSpec], Mapping[str, Any]], "TensorSpec | Results"]


@dataclass(frozen=True)
class OpDef:
    op: Op
    arity: int | None  # None = variadic (at least one input)
    required: tuple[str, ...]
    optional: tuple[str, ...]
    rule: Rule | None  # None for leaves
    launches: int = 1  # kernel launches one node costs (0 for views and leaves)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


def _same(a: D.Dim, b: D.Dim) -> bool:
    return D.dim(a) == D.dim(b)


def _broadcast(a: TensorSpec, b: TensorSpec) -> tuple[D.Dim, ...]:
    ra, rb = list(a.shape), list(b.shape)
    n = max(len(ra), len(rb))
    ra = [1] * (n - len(ra)) + ra
    rb = [1] * (n - len(rb)) + rb
    out: list[D.Dim] = []
    for x, y in zip(ra, rb):
        if _same(x, y) or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ShapeError(f"cannot broadcast {a} with {b}")
    return tuple(out)


def _unary(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    return ins[0]


def _binary(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(_broadcast(ins[0], ins[1]), ins[0].dtype)


def _swiglu(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    g, u = ins
    _need(len(g.shape) == len(u.shape) and all(_same(x, y) for x, y in zip(g.shape, u.shape)),
          f"swiglu gate {g} and up {u} differ")
    return g


def _get_rows(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    table, ids = ins
    _need(table.rank == 2, f"get_rows table must be 2-D, got {table}")
    _need(ids.dtype == I32 and ids.rank == 1, f"get_rows ids must be i32[n], got {ids}")
    return TensorSpec((ids.shape[0], table.shape[1]), dtype(attrs["dtype"]))


def _matmul(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    x, w = ins
    _need(w.rank == 2, f"matmul weight must be 2-D [out,in], got {w}")
    _need(x.rank >= 1 and _same(x.shape[-1], w.shape[1]),
          f"matmul inner dims differ: x {x} vs weight {w} (weight is [out,in])")
    return TensorSpec(x.shape[:-1] + (w.shape[0],), x.dtype)


def _moe_matmul(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    x, w, ids = ins
    _need(w.rank == 3, f"moe_matmul weight must be [experts,out,in], got {w}")
    _need(ids.rank == 2 and ids.dtype == I32, f"moe_matmul ids must be i32[T,k], got {ids}")
    _need(_same(x.shape[-1], w.shape[2]), f"moe_matmul inner dims differ: x {x} vs weight {w}")
    _need(_same(x.shape[0], ids.shape[0]), f"moe_matmul x {x} and ids {ids} differ in tokens")
    if x.rank == 3:
        _need(_same(x.shape[1], ids.shape[1]), f"moe_matmul x {x} and ids {ids} differ in k")
    else:
        _need(x.rank == 2, f"moe_matmul x must be [T,in] or [T,k,in], got {x}")
    return TensorSpec((x.shape[0], ids.shape[1], w.shape[1]), x.dtype)


def _rms_norm(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    x, w = ins[0], ins[-1]
    _need(w.rank == 1 and _same(w.shape[0], x.shape[-1]), f"rms_norm weight {w} does not match x {x}")
    if len(ins) == 3:
        _need(ins[1].shape == x.shape, f"rms_norm_gated gate {ins[1]} does not match x {x}")
    return x


def _cast(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    return ins[0].with_dtype(attrs["dtype"])


def _rope(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    x, pos = ins
    _need(x.rank == 3, f"rope input must be [T,heads,dim], got {x}")
    _need(pos.rank == 1 and _same(pos.shape[0], x.shape[0]), f"rope positions {pos} do not match {x}")
    n_rot = attrs["n_rot"]
    _need(isinstance(x.shape[2], int) and 0 < n_rot <= x.shape[2] and n_rot % 2 == 0,
          f"rope n_rot={n_rot} does not fit head dim of {x}")
    return x


def _attn_temp(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    """q [T,heads,d] * (1 + beta * ln(1 + floor(pos / length))) per token; positions i32[T]."""
    x, pos = ins
    _need(x.rank == 3 and x.dtype.is_float, f"attn_temp input must be float [T,heads,dim], got {x}")
    _need(pos.rank == 1 and pos.dtype == I32 and _same(pos.shape[0], x.shape[0]),
          f"attn_temp positions {pos} do not match {x}")
    _need(int(attrs["length"]) > 0, f"attn_temp length must be positive, got {attrs['length']}")
    return x


def _attention(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    _need(len(ins) in (3, 4), f"attention takes q, k, v and optionally sinks; got {len(ins)} inputs")
    q, k, v = ins[:3]
    _need(q.rank == 3 and k.rank == 3 and v.rank == 3, f"attention wants [T,h,d] inputs, got {q} {k} {v}")
    _need(_same(q.shape[2], k.shape[2]), f"attention q {q} and k {k} head dims differ")
    _need(_same(k.shape[0], v.shape[0]) and _same(k.shape[1], v.shape[1]), f"attention k {k} and v {v} differ")
    hq, hkv = q.shape[1], k.shape[1]
    _need(isinstance(hq, int) and isinstance(hkv, int) and hkv > 0 and hq % hkv == 0,
          f"attention needs q heads ({hq}) to be a multiple of kv heads ({hkv})")
    if len(ins) == 4:  # one sink logit per q head (gpt-oss): an extra softmax column, no value
        _need(ins[3].rank == 1 and _same(ins[3].shape[0], hq), f"attention sinks must be [{hq}], got {ins[3]}")
    w = attrs.get("window")
    _need(w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 1),
          f"attention window={w!r} must be an int >= 1 (keys within the last `window` positions)")
    return TensorSpec((q.shape[0], hq, v.shape[2]), q.dtype)


def _kv_append(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    cache, new = ins
    _need(cache.rank == new.rank and all(_same(a, b) for a, b in zip(cache.shape[1:], new.shape[1:])),
          f"kv_append cache {cache} and new rows {new} differ")
    return TensorSpec((D.add(cache.shape[0], new.shape[0]),) + cache.shape[1:], cache.dtype)


def _concat(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    ax = attrs["dim"]
    first = ins[0]
    total: D.Dim = 0
    for s in ins:
        _need(s.rank == first.rank and 0 <= ax < s.rank, f"concat dim {ax} invalid for {s}")
        _need(all(_same(a, b) for i, (a, b) in enumerate(zip(s.shape, first.shape)) if i != ax),
              f"concat inputs {first} and {s} differ off dim {ax}")
        total = D.add(total, s.shape[ax])
    return first.with_shape(first.shape[:ax] + (total,) + first.shape[ax + 1:])


def _ssm_conv(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    x, w = ins
    _need(x.rank == 2 and w.rank == 2 and _same(x.shape[1], w.shape[0]),
          f"ssm_conv wants x [K-1+T,C] and w [C,K], got {x} and {w}")
    return TensorSpec((D.sub(x.shape[0], D.sub(w.shape[1], 1)), x.shape[1]), x.dtype)


def _delta_net(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec | Results:
    raw = bool(attrs.get("raw_gates", False))
    _need(len(ins) == (8 if raw else 6), f"delta_net takes {8 if raw else 6} inputs"
          f"{' with raw_gates' if raw else ''}, got {len(ins)}")
    q, k, v, g, beta, s = ins[:6]  # raw_gates: g, beta are the projections alpha, b
    T, nk, dk = q.shape
    nv, dv = v.shape[1], v.shape[2]
    _need(k.shape == q.shape, f"delta_net q {q} and k {k} differ")
    _need(_same(v.shape[0], T) and g.shape == (T, nv) and beta.shape == (T, nv),
          f"delta_net v {v}, g {g}, beta {beta} do not match q {q}")
    _need(isinstance(nv, int) and isinstance(nk, int) and nv % nk == 0,
          f"delta_net value heads ({nv}) must be a multiple of key heads ({nk})")
    _need(s.shape == (dk, nv, dv), f"delta_net state must be [{dk},{nv},{dv}], got {s}")
    if raw:  # g = softplus(f32(alpha) + dt_bias) * a, beta = sigmoid(b): per value head
        _need(all(x.shape == (nv,) for x in ins[6:]), f"delta_net dt_bias {ins[6]} and a {ins[7]} must be [{nv}]")
    if attrs.get("in_place"):  # two results: the output rows, and the state written over input 5
        _need(s.dtype == F32, f"delta_net in_place needs an f32 state, got {s}")
        return TensorSpec((T, nv, dv), F32), s
    # packed result: rows [0,T) are the output, rows [T,T+dk) the new state (ggml does the same)
    return TensorSpec((D.add(T, dk), nv, dv), F32)


def _shared(attrs: Mapping[str, Any], op: str) -> int:
    """The optional `shared` attribute: slots appended for a shared expert folded into the
    routed ones (passes/shared_expert.py); 0 when absent."""
    m = attrs.get("shared")
    if m is None:
        return 0
    _need(isinstance(m, int) and not isinstance(m, bool) and m >= 1, f"{op} shared={m!r} must be an int >= 1")
    return m


def _moe_topk(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    (logits,) = ins
    k = attrs["k"]
    _need(logits.rank == 2 and isinstance(logits.shape[1], int) and 0 < k <= logits.shape[1],
          f"moe_topk k={k} invalid for {logits}")
    # shared=m: m more columns holding the ids E..E+m-1 (the shared expert's slots)
    return TensorSpec((logits.shape[0], k + _shared(attrs, "moe_topk")), I32)


def _moe_topk_bias(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    """ids i32[T,k] of the top-k of softmax(logits) + bias; bias f32[E] only chooses (the
    weights stay moe_weights' softmax probabilities at the ids)."""
    logits, bias = ins
    _need(bias.rank == 1 and logits.rank == 2 and _same(bias.shape[0], logits.shape[1]),
          f"moe_topk_bias bias {bias} does not match logits {logits}")
    return _moe_topk(ins[:1], attrs)


def _moe_weights(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    _need(len(ins) in (2, 3), f"moe_weights takes logits, ids and optionally a shared gate; got {len(ins)} inputs")
    logits, ids = ins[0], ins[1]
    _need(_same(logits.shape[0], ids.shape[0]), f"moe_weights logits {logits} and ids {ids} differ")
    m = _shared(attrs, "moe_weights")
    _need((len(ins) == 3) == (m > 0), f"moe_weights: a shared gate input and shared=m go together (shared={m})")
    if m:
        gate = ins[2]
        _need(gate.rank == 2 and _same(gate.shape[0], logits.shape[0]) and gate.shape[1] == 1,
              f"moe_weights shared gate must be [T,1], got {gate} for logits {logits}")
        _need(ids.rank == 2 and isinstance(ids.shape[1], int) and ids.shape[1] > m,
              f"moe_weights ids {ids} has no routed column besides the {m} shared one(s)")
    return TensorSpec(ids.shape, F32)


def _head_matmul(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    """One matrix per head: x [T,h,in] by w [h,out,in] -> [T,h,out] (MLA's absorbed projections)."""
    x, w = ins
    _need(x.rank == 3 and w.rank == 3, f"head_matmul wants x [T,h,in] and w [h,out,in], got {x} {w}")
    _need(_same(x.shape[1], w.shape[0]) and _same(x.shape[2], w.shape[2]),
          f"head_matmul x {x} does not match weight {w} (heads, inner)")
    return TensorSpec((x.shape[0], x.shape[1], w.shape[1]), x.dtype)


def _moe_topk_biased(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    """Sigmoid routing's choice: top-k of sigmoid(logits) + bias [E] within the `groups_used` best
    of `groups` expert groups (a group scores the sum of its two best); ids i32 [T,k]."""
    logits, bias = ins
    k, n, used = attrs["k"], attrs.get("groups", 1), attrs.get("groups_used", 1)
    _need(logits.rank == 2 and isinstance(logits.shape[1], int), f"moe_topk_biased logits must be [T,E], got {logits}")
    E = logits.shape[1]
    _need(bias.rank == 1 and bias.shape[0] == E, f"moe_topk_biased bias {bias} does not match logits {logits}")
    _need(isinstance(n, int) and n >= 1 and E % n == 0 and (n == 1 or E // n >= 2) and 0 < used <= n,
          f"moe_topk_biased groups={n}, groups_used={used} invalid for {E} experts")
    _need(isinstance(k, int) and 0 < k <= used * (E // n), f"moe_topk_biased k={k} invalid for {logits}")
    return TensorSpec((logits.shape[0], k), I32)


def _moe_weights_sigmoid(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    logits, ids = ins
    _need(logits.rank == 2 and ids.rank == 2 and ids.dtype == I32 and _same(logits.shape[0], ids.shape[0]),
          f"moe_weights_sigmoid wants logits [T,E] and ids i32[T,k], got {logits} {ids}")
    return TensorSpec(ids.shape, F32)


def _moe_sum(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    y, w = ins
    _need(y.rank == 3 and w.shape == y.shape[:2], f"moe_sum wants y [T,k,H] and weights [T,k], got {y} {w}")
    return TensorSpec((y.shape[0], y.shape[2]), y.dtype)


def _add_id(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    y, b, ids = ins
    _need(y.rank == 3 and b.rank == 2 and ids.rank == 2 and ids.dtype == I32,
          f"add_id wants y [T,k,N], rows [E,N] and ids i32[T,k], got {y} {b} {ids}")
    _need(_same(y.shape[2], b.shape[1]) and all(_same(a, c) for a, c in zip(y.shape[:2], ids.shape)),
          f"add_id y {y}, rows {b} and ids {ids} do not match")
    return y  # y[t,j] + b[ids[t,j]]: a per-expert bias (ggml_add_id)


def _reshape(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    (x,) = ins
    shape = tuple(D.dim(d) for d in attrs["shape"])
    _need(D.dim(D.mul_dims(shape)) == D.dim(x.numel()), f"reshape of {x} to {list(shape)} changes the size")
    return x.with_shape(shape)


def _slice(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    (x,) = ins
    ax, start, stop = attrs["dim"], D.dim(attrs["start"]), D.dim(attrs["stop"])
    _need(0 <= ax < x.rank, f"slice dim {ax} invalid for {x}")
    size = D.dim(D.sub(stop, start))
    _need(not isinstance(size, int) or size > 0, f"slice [{start}:{stop}] of {x} is empty")
    if isinstance(x.shape[ax], int) and isinstance(stop, int):
        _need(stop <= x.shape[ax] and isinstance(start, int) and start >= 0,
              f"slice [{start}:{stop}] out of range for {x}")
    return x.with_shape(x.shape[:ax] + (size,) + x.shape[ax + 1:])


def _all_reduce(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    first = ins[0]
    for s in ins[1:]:
        _need(s.shape == first.shape, f"all_reduce partials differ: {first} vs {s}")
    return first


# the fused ops' rules live beside this table (they read the rules above when called)
from graphir.ops_fused import (_add_rms_norm, _cast_rms_norm_gated, _moe_matmul_routed,  # noqa: E402
                               _moe_route, _moe_sum_add_rms_norm, _moe_topk_weights, _result, _ssm_conv_step,
                               _swiglu_moe_matmul)

_F = ("dtype",)
_NORM = ("eps",), ("offset",)
DEFS: dict[Op, OpDef] = {d.op: d for d in (
    OpDef(Op.INPUT, 0, ("role",), (), None, 0),
    OpDef(Op.WEIGHT, 0, (), ("src", "slice_dim", "start", "stop"), None, 0),
    OpDef(Op.STATE_IN, 0, ("state",), ("src", "slice_dim", "start", "stop"), None, 0),
    OpDef(Op.GET_ROWS, 2, _F, ("scale",), _get_rows),  # scale: rows times a constant (Gemma's sqrt(H))
    OpDef(Op.MATMUL, 2, (), (), _matmul),
    OpDef(Op.MOE_MATMUL, 3, (), (), _moe_matmul),
    OpDef(Op.RMS_NORM, 2, ("eps",), ("offset",), _rms_norm),
    OpDef(Op.RMS_NORM_GATED, 3, ("eps",), (), _rms_norm),
    OpDef(Op.ADD, 2, (), (), _binary),
    OpDef(Op.MUL, 2, (), (), _binary),
    OpDef(Op.SILU, 1, (), (), _unary),
    OpDef(Op.SIGMOID, 1, (), (), _unary),
    OpDef(Op.SOFTPLUS, 1, (), (), _unary),
    OpDef(Op.SWIGLU, 2, (), (), _swiglu),
    # gpt-oss: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit)
    OpDef(Op.SWIGLU_OAI, 2, ("alpha", "limit"), (), _swiglu),
    OpDef(Op.GEGLU, 2, (), (), _swiglu),  # gelu_tanh(gate) * up (Gemma)
    OpDef(Op.SOFTCAP, 1, ("cap",), (), _unary),  # cap * tanh(x / cap): logit soft-capping
    OpDef(Op.CAST, 1, _F, (), _cast),
    OpDef(Op.ROPE, 2, ("n_rot", "theta"), ("scaling", "factor", "low_freq_factor", "high_freq_factor",
                                             "original_ctx", "attn_factor", "beta_fast", "beta_slow", "truncate"), _rope),
    OpDef(Op.ATTN_TEMP, 2, ("beta", "length"), (), _attn_temp),
    OpDef(Op.ATTENTION, None, ("scale",), ("window",), _attention),  # q, k, v[, sinks]
    OpDef(Op.KV_APPEND, 2, (), (), _kv_append),
    OpDef(Op.CONCAT, None, ("dim",), (), _concat),
    OpDef(Op.SSM_CONV, 2, (), ("act",), _ssm_conv),
    OpDef(Op.DELTA_NET, None, (), ("qk_l2norm", "raw_gates", "in_place"), _delta_net),
    OpDef(Op.MOE_TOPK, 1, ("k",), ("shared",), _moe_topk),
    OpDef(Op.MOE_TOPK_BIAS, 2, ("k",), (), _moe_topk_bias),
    OpDef(Op.MOE_WEIGHTS, None, ("norm",), ("shared",), _moe_weights),  # logits, ids[, shared gate]
    OpDef(Op.MOE_SUM, 2, (), (), _moe_sum),
    OpDef(Op.HEAD_MATMUL, 2, (), (), _head_matmul),
    OpDef(Op.MOE_TOPK_BIASED, 2, ("k",), ("groups", "groups_used"), _moe_topk_biased),  # logits, bias
    OpDef(Op.MOE_WEIGHTS_SIGMOID, 2, ("norm",), ("scale",), _moe_weights_sigmoid),  # logits, ids
    OpDef(Op.ADD_ID, 3, (), (), _add_id),
    OpDef(Op.RESHAPE, 1, ("shape",), (), _reshape, 0),
    OpDef(Op.SLICE, 1, ("dim", "start", "stop"), (), _slice, 0),
    OpDef(Op.COPY, 1, (), (), _unary),
    OpDef(Op.ALL_REDUCE, None, (), ("dtype",), _all_reduce),
    OpDef(Op.OUTPUT, 1, ("key",), (), _unary, 0),
    OpDef(Op.RESULT, None, ("index",), (), _result, 0),
    OpDef(Op.ADD_RMS_NORM, 3, *_NORM, _add_rms_norm),
    OpDef(Op.MOE_SUM_ADD_RMS_NORM, 4, *_NORM, _moe_sum_add_rms_norm),
    OpDef(Op.MOE_TOPK_WEIGHTS, None, ("k",), ("shared",), _moe_topk_weights),  # logits[, shared gate]
    OpDef(Op.CAST_RMS_NORM_GATED, 3, ("eps", "dtype"), (), _cast_rms_norm_gated),
    OpDef(Op.SWIGLU_MOE_MATMUL, 4, (), (), _swiglu_moe_matmul),
    OpDef(Op.SSM_CONV_STEP, 3, (), ("act", "in_place"), _ssm_conv_step),
    OpDef(Op.MOE_ROUTE, 1, ("experts",), (), _moe_route),
    OpDef(Op.MOE_MATMUL_ROUTED, 5, (), (), _moe_matmul_routed),
)}

LEAVES = frozenset({Op.INPUT, Op.WEIGHT, Op.STATE_IN})
VIEWS = frozenset(op for op, d in DEFS.items() if d.launches == 0 and op not in LEAVES)
# ops that pass weights on unchanged (a merged weight's concat, a weight's slice or copy to
# another device): with weights alone as inputs they are load-time constants
CONST_OPS = frozenset({Op.COPY, Op.RESHAPE, Op.SLICE, Op.CONCAT})


def check_attrs(op: Op, attrs: Mapping[str, Any]) -> None:
    d = DEFS[op]
    missing = [a for a in d.required if a not in attrs]
    unknown = [a for a in attrs if a not in d.required and a not in d.optional]
    if missing:
        raise ShapeError(f"{op.value} needs attribute(s) {', '.join(missing)}")
    if unknown:
        raise ShapeError(f"{op.value} has unknown attribute(s) {', '.join(unknown)}")


_INFERRED: dict[tuple[Any, ...], TensorSpec] = {}  # rules are pure: layers repeat the same shapes


def infer_results(op: Op, ins: Sequence[Results], attrs: Mapping[str, Any]) -> Results:
    """The specs of every result of `op`, given every input's results (most ops have one).
    A `result` node picks one result of its single input; any other op reads result 0."""
    if op == Op.RESULT:
        _need(len(ins) == 1, f"result takes 1 input, got {len(ins)}")
        got = infer(op, ins[0], attrs)
    else:
        got = infer(op, [r[0] for r in ins], attrs)
    return got if isinstance(got, tuple) else (got,)


def infer(op: Op, ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> Any:
    """The output spec of `op` on inputs `ins` (a tuple of specs for an op with several
    results: see infer_results); raises ShapeError naming what is wrong.
    Memoised on (op, input specs, attrs): building, verifying and placing a 48-layer model
    then costs a dict lookup per node instead of re-parsing symbolic dims."""
    try:
        key: tuple[Any, ...] | None = (op, tuple(ins), tuple(sorted(attrs.items())))
        got = _INFERRED.get(key)  # type: ignore[arg-type]
    except TypeError:  # an unhashable attribute value: infer without the memo
        key, got = None, None
    if got is not None:
        return got
    got = _infer(op, ins, attrs)
    if key is not None:
        if len(_INFERRED) > 100_000:
            _INFERRED.clear()
        _INFERRED[key] = got
    return got


def _infer(op: Op, ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec | Results:
    d = DEFS[op]
    check_attrs(op, attrs)
    if d.rule is None:
        raise ShapeError(f"{op.value} is a leaf: its spec is given, not inferred")
    if d.arity is None:
        _need(len(ins) >= 1, f"{op.value} needs at least one input")
    else:
        _need(len(ins) == d.arity, f"{op.value} takes {d.arity} inputs, got {len(ins)}")
    return d.rule(ins, attrs)


def act_dtype(name: str | DType) -> DType:
    dt = dtype(name)
    if not dt.is_float:
        raise ShapeError(f"{dt.name} is not a compute type (use f32, f16 or bf16)")
    return dt
