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

from graphir.op_shapes import (  # ShapeError and act_dtype are re-exported
    Results, ShapeError, act_dtype, _add_id, _all_reduce, _attention, _attn_temp, _binary, _cast, _concat,
    _delta_net, _get_rows, _head_matmul, _kv_append, _matmul, _moe_matmul, _moe_sum, _moe_topk, _moe_topk_bias,
    _moe_topk_biased, _moe_weights, _moe_weights_sigmoid, _need, _reshape, _rms_norm, _rope, _slice,
    _ssm_conv, _swiglu, _unary)
from graphir.spec import TensorSpec


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
    RMS_NORM_PLAIN = "rms_norm_plain"  # x * rsqrt(mean(x^2) + eps), no weight (Gemma 4's value norm)
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
    OpDef(Op.RMS_NORM_PLAIN, 1, ("eps",), (), _unary),
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
                                             "original_ctx", "attn_factor", "beta_fast", "beta_slow", "truncate",
                                             "rot_pairs"), _rope),
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
