"""Shape rules of the fused ops (graphir.ops.DEFS lists them): one kernel for what several
nodes of the unfused graph compute, each rule built from the rules of the ops it replaces so
a fused node's specs are exactly those of the values it stands for. The fusion passes
(passes/fuse.py) make these nodes; `result` picks one result of a node with several.

This module is imported by graphir.ops while that module loads, so it reads ops' rules
through the module at call time, never at import time.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from graphir import dims as D
from graphir import op_shapes as _o
from graphir.dtypes import F32, I32, I64
from graphir.spec import TensorSpec

Results = tuple[TensorSpec, ...]


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise _o.ShapeError(msg)


def _result(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    # called by infer_results with the *results* of its one input, not with input specs
    k = attrs["index"]
    _need(len(ins) > 1, "result reads a node with several results")
    _need(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(ins),
          f"result index={k!r} out of range for {len(ins)} results")
    return ins[k]


def _add_rms_norm(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> Results:
    a, b, w = ins  # (a + b, rms_norm(a + b, w)): a residual add and the norm that reads it
    _need(a.shape == b.shape and a.dtype == b.dtype, f"add_rms_norm wants two rows of one spec, got {a} {b}")
    return a, _o._rms_norm([a, w], attrs)


def _moe_sum_add_rms_norm(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> Results:
    a, y, wk, w = ins  # (a + moe_sum(y, wk), its rms_norm)
    s = _o._moe_sum([y, wk], attrs)
    _need(s == a, f"moe_sum_add_rms_norm residual {a} and expert sum {s} differ")
    return a, _o._rms_norm([a, w], attrs)


def _moe_topk_weights(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> Results:
    m = _o._shared(attrs, "moe_topk_weights")
    _need(len(ins) == (2 if m else 1), f"moe_topk_weights takes logits{' and the shared gate' if m else ''}; "
          f"got {len(ins)} inputs")
    ids = _o._moe_topk(ins[:1], attrs)  # (ids, softmax over the chosen logits [, m x sigmoid(gate)])
    if m:
        _o._moe_weights([ins[0], ids, ins[1]], {"norm": True, "shared": m})
    return ids, ids.with_dtype(F32)


def _cast_rms_norm_gated(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    x, z, w = ins  # rms_norm_gated(cast(x, dtype), z, w): x rounded as the norm loads it
    out = _o.act_dtype(attrs["dtype"])
    _need(x.dtype.is_float, f"cast_rms_norm_gated x must be a float, got {x}")
    return _o._rms_norm([x.with_dtype(out), z, w], attrs)


def _swiglu_moe_matmul(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    g, u, w, ids = ins  # moe_matmul(swiglu(g, u), w, ids): the GEMV applies swiglu as it loads x
    _need(g.rank == 3, f"swiglu_moe_matmul x must be [T,k,F], got {g}")
    return _o._moe_matmul([_o._swiglu([g, u], attrs), w, ids], attrs)


def _ssm_conv_step(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> Results:
    s, x, w = ins  # ssm_conv(concat(s, x), w) and the state's next value, concat(s, x)[T:]
    _need(s.rank == 2 and x.rank == 2 and s.dtype == x.dtype and _o._same(s.shape[1], x.shape[1]),
          f"ssm_conv_step wants state [K-1,C] and x [T,C] of one type, got {s} and {x}")
    _need(w.rank == 2 and isinstance(w.shape[1], int) and _o._same(s.shape[0], w.shape[1] - 1),
          f"ssm_conv_step state {s} must hold K-1 rows of the weight {w}")
    joined = TensorSpec((D.add(s.shape[0], x.shape[0]), x.shape[1]), x.dtype)
    return _o._ssm_conv([joined, w], {}), s


def _moe_route(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> Results:
    (ids,) = ins  # the slots of ids [T,k] sorted by expert: (slot order i64 [T*k], group ends i32 [E])
    E = attrs["experts"]
    _need(ids.rank == 2 and ids.dtype == I32, f"moe_route ids must be i32[T,k], got {ids}")
    _need(isinstance(E, int) and not isinstance(E, bool) and E >= 1, f"moe_route experts={E!r} must be an int >= 1")
    return TensorSpec((ids.numel(),), I64), TensorSpec((E,), I32)


def _moe_matmul_routed(ins: Sequence[TensorSpec], attrs: Mapping[str, Any]) -> TensorSpec:
    x, w, ids, order, ends = ins  # moe_matmul(x, w, ids) reading the route every matmul of ids shares
    _need((order, ends) == _moe_route([ids], {"experts": w.shape[0]}),
          f"moe_matmul_routed route {order}, {ends} is not that of ids {ids} over the {w.shape[0]} experts")
    return _o._moe_matmul([x, w, ids], attrs)
