"""The fused kernels a decode step swaps in where step_rewrites' patterns hold.

`Fusions(graph, schedule, state, weights, base)` finds the patterns once per DecodeStep,
rewrites the schedule where a kernel reads other inputs (the top-k reads the shared gate, the
in-place conv reads the state) and gives the kernels that replace the base table's:

- residual add + rms_norm in one launch (the norm node takes the value made ahead);
- moe_sum + residual add + rms_norm in one launch;
- a cast to a narrower float rounded by the gated norm as it loads;
- the swiglu applied by the down projection's expert GEMV as it loads;
- top-k and the shared-expert routing weights in one launch;
- the conv step that shifts its state in place.

A fused-away node hands its only reader a `Deferred` value (what to compute, not the result);
a reader that cannot fuse at run time (a shape, a device) materializes it, which runs the
node's own kernel then.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from backends.cuda import fast_moe, fused
from backends.cuda.devices import torch_dtype
from backends.cuda.interp import ExecContext, Kernel
from backends.cuda.step_rewrites import (add_norms, cast_norms, conv_in_place, inplace_convs, moe_sum_adds,
                                         swiglu_gemvs, topk_gates, topk_with_gate)
from graphir.graph import Node
from graphir.ops import Op


class Deferred:
    """A node's value left to its only reader, which computes it inside its own kernel."""

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError


class Uncast(Deferred):
    """A cast left to a gated norm that rounds as it loads."""

    def __init__(self, value: torch.Tensor, dtype: torch.dtype) -> None:
        self.value, self.dtype = value, dtype

    def materialize(self) -> torch.Tensor:
        return self.value.to(self.dtype)


class Swiglu(Deferred):
    """A swiglu left to the expert GEMV that reads it."""

    def __init__(self, g: torch.Tensor, u: torch.Tensor) -> None:
        self.g, self.u = g, u

    def materialize(self) -> torch.Tensor:
        return fused.swiglu(self.g, self.u)


class MoeSum(Deferred):
    """A weighted expert sum left to the residual add (and norm) that reads it."""

    def __init__(self, y: torch.Tensor, w: torch.Tensor) -> None:
        self.y, self.w = y, w

    def materialize(self) -> torch.Tensor:
        return fast_moe.moe_sum(self.y, self.w)


def _plain(x: Any) -> Any:
    return x.materialize() if isinstance(x, Deferred) else x


def _norm_args(norm: Node) -> tuple[float, float]:
    return float(norm.attr["eps"]), float(norm.attr.get("offset", 0.0))


class Fusions:
    def __init__(self, g: Any, schedule: list[tuple], state: dict[str, torch.Tensor],
                 weights: Mapping[str, torch.Tensor], base: Mapping[Op, Kernel]) -> None:
        self.base, self.weights = base, weights
        self.ahead: dict[str, Any] = {}  # node -> its value, made by an earlier node's kernel
        self.add_norms = add_norms(g)  # residual add -> the rms_norm reading it
        self.moe_sums = moe_sum_adds(g, self.add_norms)  # moe_sums the add+norm after them computes
        self.swiglus = swiglu_gemvs(g)  # swiglus the expert GEMV after them applies
        self.cast_norms = cast_norms(g)  # casts only a gated norm reads
        self.conv_inplace = inplace_convs(g, state)
        pairs = topk_gates(g)
        schedule, gated = topk_with_gate(schedule, pairs)
        self.topk_weights = {t: pairs[t][0] for t in gated}  # top-k node -> its moe_weights node
        self.schedule = conv_in_place(schedule, g, self.conv_inplace) if self.conv_inplace else schedule

    def kernels(self) -> dict[Op, Kernel]:
        """The replacements, for the ops whose patterns the graph holds."""
        out: dict[Op, Kernel] = {}
        if self.add_norms:
            out[Op.ADD], out[Op.RMS_NORM] = self._add, self._taken(Op.RMS_NORM)
        if self.moe_sums:
            out[Op.MOE_SUM] = self._moe_sum
        if self.swiglus:
            out[Op.SWIGLU], out[Op.MOE_MATMUL] = self._swiglu, self._moe_matmul
        if self.topk_weights:
            out[Op.MOE_TOPK], out[Op.MOE_WEIGHTS] = self._moe_topk, self._taken(Op.MOE_WEIGHTS)
        if self.cast_norms:
            out[Op.CAST], out[Op.RMS_NORM_GATED] = self._cast, self._rms_norm_gated
        if self.conv_inplace:
            out[Op.SSM_CONV] = self._ssm_conv
        return out

    def _taken(self, op: Op) -> Kernel:
        """A node whose value an earlier kernel made: take it, else run its own kernel."""
        def kernel(node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
            got = self.ahead.pop(node.name, None)
            return got if got is not None else self.base[op](node, args, ctx)
        return kernel

    def _add(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        norm = self.add_norms.get(node.name)
        a, b = args
        if isinstance(a, MoeSum):
            a, b = b, a  # the sum's operand order does not change an f32 sum
        if norm is not None and isinstance(b, MoeSum) and isinstance(a, torch.Tensor) and fused.usable(a) \
                and a.dim() == 2 and b.y.dim() == 3 and a.shape == (b.y.shape[0], b.y.shape[2]) \
                and a.dtype == b.y.dtype:
            total, normed = fast_moe.moe_add_rms_norm(a, b.y, b.w, self.weights[norm.inputs[1]], *_norm_args(norm))
            self.ahead[norm.name] = normed  # sum, add and norm in one launch; the norm node takes it
            return total
        a, b = _plain(a), _plain(b)
        if norm is None or not fused.usable(a) or not isinstance(b, torch.Tensor) or a.shape != b.shape \
                or a.dim() != 2 or a.dtype != b.dtype:
            return self.base[Op.ADD](node, [a, b], ctx)
        total, normed = fused.add_rms_norm(a, b, self.weights[norm.inputs[1]], *_norm_args(norm))
        self.ahead[norm.name] = normed  # one launch for both; the norm node takes it
        return total

    def _moe_sum(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        y, w = args
        if node.name in self.moe_sums and isinstance(y, torch.Tensor) and fused.usable(y) and y.dim() == 3:
            return MoeSum(y, w)  # computed by the add (and norm) that reads it
        return self.base[Op.MOE_SUM](node, args, ctx)

    def _swiglu(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        g, u = args
        if node.name in self.swiglus and fused.usable(g) and g.dim() == 3 and g.shape == u.shape \
                and g.dtype == u.dtype and g.shape[0] * g.shape[1] <= fast_moe.DECODE_SLOTS:
            return Swiglu(g, u)  # applied by the expert GEMV as it loads
        return self.base[Op.SWIGLU](node, args, ctx)

    def _moe_matmul(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        x, w, ids = args
        if isinstance(x, Swiglu) and ids.numel() <= fast_moe.DECODE_SLOTS and ids.shape == x.g.shape[:2]:
            return fast_moe.moe_gemv(x.g, w, ids, up=x.u)
        return self.base[Op.MOE_MATMUL](node, [_plain(x), w, ids], ctx)

    def _moe_topk(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        if len(args) == 1:
            return self.base[Op.MOE_TOPK](node, args, ctx)
        logits, gate = args  # rewritten by topk_with_gate
        k, m = int(node.attr["k"]), int(node.attr["shared"])
        if not fast_moe.topk_ok(logits, k + m) or gate.shape != (logits.shape[0], 1):
            return self.base[Op.MOE_TOPK](node.with_(inputs=node.inputs[:1]), [logits], ctx)
        ids, wts = fast_moe.topk_softmax(logits, k, m, gate)
        self.ahead[self.topk_weights[node.name]] = wts  # the moe_weights node takes them
        return ids

    def _cast(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        if node.name in self.cast_norms and isinstance(args[0], torch.Tensor) and fused.usable(args[0]):
            return Uncast(args[0], torch_dtype(str(node.attr["dtype"])))  # no kernel: the norm casts
        return self.base[Op.CAST](node, args, ctx)

    def _rms_norm_gated(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        x, z, w = args
        if isinstance(x, Uncast) and x.value.dim() <= 3:
            return fused.rms_norm_gated(x.value, z, w, float(node.attr["eps"]), dtype=x.dtype)
        return self.base[Op.RMS_NORM_GATED](node, [_plain(x), z, w], ctx)

    def _ssm_conv(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        if len(node.inputs) == 2:
            return self.base[Op.SSM_CONV](node, args, ctx)
        state, x, w = args  # rewritten by conv_in_place: the state is read and shifted in place
        return fused.conv_step(state, x, w, node.attr.get("act") == "silu")
