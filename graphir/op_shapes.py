"""Shape and dtype rules of the plain ops: each takes the input specs and the attributes and
returns the result spec (or, for an op with several results, their tuple), raising ShapeError
with the numbers that do not fit. graphir.ops lists them in its table DEFS; the fused ops'
rules (graphir.ops_fused) build on these."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from graphir import dims as D
from graphir.dtypes import DType, F32, I32, dtype
from graphir.errors import GraphirError
from graphir.spec import TensorSpec

Results = tuple[TensorSpec, ...]


class ShapeError(GraphirError):
    """Inputs or attributes an op cannot accept."""



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
    _need(0 <= attrs.get("rot_pairs", 0) <= n_rot // 2, f"rope rot_pairs={attrs.get('rot_pairs')} exceeds n_rot/2")
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


def act_dtype(name: str | DType) -> DType:
    dt = dtype(name)
    if not dt.is_float:
        raise ShapeError(f"{dt.name} is not a compute type (use f32, f16 or bf16)")
    return dt
