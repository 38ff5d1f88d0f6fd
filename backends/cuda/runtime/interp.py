"""The graph walk: one environment of values, each freed after its last use.

`run_graph` executes the nodes in program order with a kernel rule table (`dict[Op, Kernel]`)
and returns the `output` nodes' values by key. Placed graphs run as they are: every node's
device names where its result lives; a collective's value is a `Replicas` (one tensor per
device of its group) and each consumer reads the replica on its own device. A failing kernel
raises ExecError naming the node, its op and its inputs' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from backends.cuda.reference import kv_quant
from backends.cuda.runtime.choices import KernelChoices
from backends.cuda.runtime.devices import describe, torch_device, torch_dtype
from graphir import dims as D
from graphir.errors import GraphirError
from graphir.graph import Graph, Node, is_constant
from graphir.ops import Op


class ExecError(GraphirError):
    """A node that could not be executed; the message names it and its inputs."""


class Replicas(dict):
    """A value present on several devices (an all-reduce result): device name -> tensor."""

    def on(self, device: str | None) -> torch.Tensor:
        if device in self:
            return self[device]
        return next(iter(self.values()))  # unplaced readers (and copies) take the first


@dataclass
class ExecContext:
    """What kernels may read besides their inputs."""

    graph: Graph
    symbols: Mapping[str, int]  # T, KV bound for this call
    feeds: Mapping[str, torch.Tensor]  # input and state_in values by node name
    weights: Mapping[str, torch.Tensor]  # weight leaves by node name, already on their device
    buffers: Mapping[str, torch.Tensor] = field(default_factory=dict)  # state name -> preallocated cache
    default_device: str = "cpu"
    # bucket mode (a captured decode step): caches are read as their first `bucket` rows and
    # written at the device-side position kvpos[device] (int64 [1]); see rules/fastpath.py
    bucket: int | None = None
    kvpos: Mapping[str, torch.Tensor] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # per-call constants kernels keep (index ranges)
    # the session's timed and fallible kernel choices (choices.py); a fresh one outside a session
    choices: KernelChoices = field(default_factory=KernelChoices)
    _shapes: dict[Any, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def bind(self, d: D.Dim) -> int:
        return d if isinstance(d, int) else D.bind(d, self.symbols)

    def shape(self, node: Node) -> tuple[int, ...]:
        # binding parses the symbolic dims: once per distinct spec and call, not per node
        got = self._shapes.get(node.spec)
        if got is None:
            got = self._shapes[node.spec] = node.spec.bind(self.symbols)
        return got

    def device_name(self, node: Node) -> str:
        return node.devices[0] if node.device else self.default_device

    def device(self, node: Node) -> torch.device:
        return torch_device(self.device_name(node))


Kernel = Callable[[Node, Sequence[Any], ExecContext], Any]


@dataclass
class RunStats:
    nodes: int = 0
    peak_live: int = 0  # most values held at once (weights held by the session not counted)


def _read(v: Any, node: Node) -> Any:
    # a consumer reads the replica on its own device; a copy takes its target's if present
    if isinstance(v, Replicas):
        return v.on(node.devices[0] if node.device else None)
    return v


def _check(node: Node, out: Any, ctx: ExecContext, weight_like: bool) -> None:
    """Results must match the spec the IR promised (catches kernel bugs at the node). Weights
    are held in the compute type while their spec names the storage type (bf16, q4_k, ...),
    so weights and views or copies of them are checked for shape only."""
    if node.outs:  # an op with several results: a tuple, one tensor per result
        if not isinstance(out, tuple) or len(out) != len(node.results):
            raise ExecError(f"%{node.name} ({node.op.value}) produced {type(out).__name__}, not its "
                            f"{len(node.results)} results")
        for t, spec in zip(out, node.results):
            _check_one(node, t, spec.bind(ctx.symbols), torch_dtype(spec.dtype), spec.dtype.name)
        return
    vals = out.values() if isinstance(out, Replicas) else (out,)
    shape, name = ctx.shape(node), node.spec.dtype.name
    if name in kv_quant.EXECUTABLE and not weight_like:  # a block-quantised cache: its raw blocks
        shape, want_dt = kv_quant.stored_shape(name, shape), torch.uint8
    else:
        want_dt = None if weight_like else torch_dtype(node.spec.dtype)
    for t in vals:
        _check_one(node, t, shape, want_dt, name)


def _check_one(node: Node, t: torch.Tensor, want_shape: tuple[int, ...], want_dt: torch.dtype | None,
               spec_dt: str) -> None:
    if tuple(t.shape) != want_shape or (want_dt is not None and t.dtype != want_dt):
        raise ExecError(f"%{node.name} ({node.op.value}) produced {describe(t)}, its spec is "
                        f"{spec_dt}[{','.join(map(str, want_shape))}]")


def run_graph(graph: Graph, ctx: ExecContext, kernels: Mapping[Op, Kernel],
              stats: RunStats | None = None, check: bool = True) -> dict[str, Any]:
    """Execute `graph`; returns {output key: value}. Values die after their last use.
    `check=False` skips comparing each result with its spec: a timed run of a graph whose
    kernels were already checked on the same shapes (a few microseconds a node)."""
    env: dict[str, Any] = {}
    results: dict[str, Any] = {}
    last = graph.last_use
    st = stats if stats is not None else RunStats()
    weights: set[str] = set()
    for pos, node in enumerate(graph.nodes):
        args = [_read(env[i], node) for i in node.inputs]
        try:
            out = kernels[node.op](node, args, ctx)
        except GraphirError as e:
            raise ExecError(_where(node, args) + str(e)) from None
        except Exception as e:  # a kernel failing is reported at the node, in one line
            raise ExecError(_where(node, args) + f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
                from e
        if is_constant(node, weights):
            weights.add(node.name)
        if check:
            _check(node, out, ctx, node.name in weights)
        if node.op == Op.OUTPUT:
            results[node.attr["key"]] = out
        env[node.name] = out
        st.peak_live = max(st.peak_live, len(env))
        for i in dict.fromkeys(node.inputs):  # an input read twice is freed once
            if last.get(i) == pos:
                del env[i]
        if node.name not in last:  # never read (outputs, dead values)
            del env[node.name]
        st.nodes += 1
    return results


def _where(node: Node, args: Sequence[Any]) -> str:
    ins = ", ".join(f"%{n} {describe(a)}" for n, a in zip(node.inputs, args))
    dev = f" @{node.device}" if node.device else ""
    return f"%{node.name} ({node.op.value}){dev} on inputs ({ins}): "
