"""Frozen nodes and the graph: a flat, topologically ordered tuple of uniquely named nodes.

Program order is execution order. Passes never mutate a graph: they build a new one
(`Graph.replace_nodes` or a Builder). Analyses return separate results; nothing is ever
written back onto nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Container, Iterable, Iterator, Mapping

from graphir.errors import GraphirError
from graphir.ops import CONST_OPS, LEAVES, Op, ShapeError, check_attrs, infer_results
from graphir.spec import TensorSpec

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.#\-]*")
_LAYER_RE = re.compile(r"blk\.(\d+)\.")

AttrValue = Any  # int | float | str | bool | tuple of those


class GraphError(GraphirError):
    """A graph that breaks an invariant; the message names the node."""


def _freeze(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        raise GraphError("attribute values cannot be dicts")
    return v


def freeze_attrs(attrs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    items = attrs.items() if isinstance(attrs, Mapping) else attrs
    return tuple(sorted((k, _freeze(v)) for k, v in items if v is not None))


@dataclass(frozen=True)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...]
    spec: TensorSpec
    attrs: tuple[tuple[str, AttrValue], ...] = ()
    device: str | None = None  # "cuda:0"; a collective lists its group: "cuda:0,cuda:1"
    # a fused op with several results: the specs of results 1.. (`spec` is result 0); such a
    # node is read only through `result {index}` views
    outs: tuple[TensorSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "attrs", freeze_attrs(self.attrs))
        object.__setattr__(self, "outs", tuple(self.outs))

    @property
    def results(self) -> tuple[TensorSpec, ...]:
        """Every result's spec, result 0 first (one for all but a few fused ops)."""
        return (self.spec,) + self.outs

    @cached_property
    def attr(self) -> dict[str, AttrValue]:
        return dict(self.attrs)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.device.split(",")) if self.device else ()

    @property
    def layer(self) -> int | None:
        """The layer index from a GGUF-style name (`blk.12.attn_q` -> 12), None outside layers."""
        m = _LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    def with_(self, **changes: Any) -> "Node":
        fields = {"name": self.name, "op": self.op, "inputs": self.inputs, "spec": self.spec,
                  "attrs": self.attrs, "device": self.device, "outs": self.outs}
        fields.update(changes)
        return Node(**fields)


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    meta: tuple[tuple[str, AttrValue], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "meta", freeze_attrs(self.meta))

    @cached_property
    def index(self) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for n in self.nodes:
            if n.name in out:
                raise GraphError(f"duplicate node name %{n.name}")
            out[n.name] = n
        return out

    @cached_property
    def info(self) -> dict[str, AttrValue]:
        return dict(self.meta)

    def __getitem__(self, name: str) -> Node:
        return self.index[name]

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def by_op(self, op: Op) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    @cached_property
    def users(self) -> dict[str, tuple[str, ...]]:
        """Consumers of each node, in program order (an analysis, rebuilt per graph)."""
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i in out and (not out[i] or out[i][-1] != n.name):
                    out[i].append(n.name)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def last_use(self) -> dict[str, int]:
        """Position of the last consumer of each value (for freeing in executors)."""
        out: dict[str, int] = {}
        for pos, n in enumerate(self.nodes):
            for i in n.inputs:
                out[i] = pos
        return out

    def outputs(self) -> dict[str, Node]:
        """Graph results by key (`logits`, or a state name for state outputs)."""
        return {n.attr["key"]: n for n in self.nodes if n.op == Op.OUTPUT}

    def replace_nodes(self, nodes: Iterable[Node], **meta: AttrValue) -> "Graph":
        m = dict(self.meta)
        m.update(meta)
        return Graph(tuple(nodes), tuple(m.items()))

    @property
    def placed(self) -> bool:
        return all(n.device for n in self.nodes)

    def device_list(self) -> tuple[str, ...]:
        """Devices in order of first appearance (deterministic)."""
        seen: dict[str, None] = {}
        for n in self.nodes:
            for d in n.devices:
                seen.setdefault(d, None)
        return tuple(seen)


def is_constant(n: Node, const: Container[str]) -> bool:
    """A weight, or a CONST_OPS node whose inputs are all in `const`: computed once at load
    (executors fold it; the cost model prices it as free)."""
    return n.op == Op.WEIGHT or (n.op in CONST_OPS and bool(n.inputs) and all(i in const for i in n.inputs))


def constants(g: Graph) -> set[str]:
    """Names of g's load-time constants (see is_constant)."""
    out: set[str] = set()
    for n in g.nodes:
        if is_constant(n, out):
            out.add(n.name)
    return out


def verify(g: Graph) -> None:
    """Re-check every invariant: unique names, topological order, op arity and attrs, specs
    recomputed from inputs, nodes with several results read only through `result` views, no
    value read after a node overwrote it in place, and, for placed graphs, that no node reads
    a value from a device it is not on (only copies and collectives cross devices)."""
    seen: dict[str, Node] = {}
    overwritten: dict[str, str] = {}  # state value -> the in-place node that wrote over it
    placed = any(n.device for n in g.nodes)
    for n in g.nodes:
        if not NAME_RE.fullmatch(n.name):
            raise GraphError(f"%{n.name}: bad node name")
        if n.name in seen:
            raise GraphError(f"%{n.name}: duplicate node name")
        for i in n.inputs:
            if i not in seen:
                raise GraphError(f"%{n.name}: input %{i} is not defined before it")
            if i in overwritten:
                raise GraphError(f"%{n.name} reads %{i} after %{overwritten[i]} wrote over it in place")
            if seen[i].outs and n.op != Op.RESULT:
                raise GraphError(f"%{n.name} reads %{i}, which has several results: read one through a result node")
        try:
            if n.op in LEAVES:
                if n.inputs or n.outs:
                    raise ShapeError(f"{n.op.value} takes no inputs and has one result")
                check_attrs(n.op, n.attr)
            else:
                got = infer_results(n.op, [seen[i].results for i in n.inputs], n.attr)
                if got != n.results:
                    have = ", ".join(map(str, n.results))
                    raise ShapeError(f"spec {have} but its inputs give {', '.join(map(str, got))}")
        except ShapeError as e:
            raise GraphError(f"%{n.name} ({n.op.value}): {e}") from None
        if n.attr.get("in_place"):
            _verify_in_place(n, seen, overwritten)
        if placed:
            _verify_device(n, seen)
        seen[n.name] = n


# the input an in-place op writes its new state over
IN_PLACE_INPUT = {Op.DELTA_NET: 5, Op.SSM_CONV_STEP: 0}


def _verify_in_place(n: Node, seen: Mapping[str, Node], overwritten: dict[str, str]) -> None:
    """An in-place node writes over a state leaf: nothing may read that leaf after it."""
    k = IN_PLACE_INPUT.get(n.op)
    if k is None or len(n.inputs) <= k:
        raise GraphError(f"%{n.name} ({n.op.value}): in_place is not an attribute of this op")
    src = seen[n.inputs[k]]
    if src.op != Op.STATE_IN:
        raise GraphError(f"%{n.name}: in_place writes over %{src.name}, which is not a state_in")
    overwritten[src.name] = n.name


def _verify_device(n: Node, seen: Mapping[str, Node]) -> None:
    if not n.device:
        raise GraphError(f"%{n.name}: no device in a placed graph")
    if len(n.devices) > 1 and n.op != Op.ALL_REDUCE:
        raise GraphError(f"%{n.name}: only collectives may span devices ({n.device})")
    if n.op == Op.COPY:
        return  # a copy reads from anywhere; that is its job
    if n.op == Op.ALL_REDUCE:
        srcs = [seen[i].devices for i in n.inputs]
        for i, src in zip(n.inputs, srcs):
            if len(src) != 1 or src[0] not in n.devices:
                raise GraphError(f"%{n.name}: partial %{i} on {','.join(src)} is outside the group {n.device}")
        if sorted(s[0] for s in srcs) != sorted(n.devices):
            raise GraphError(f"%{n.name}: group {n.device} needs one partial per device")
        return
    here = n.devices[0]
    for i in n.inputs:
        src = seen[i].devices
        if here not in src:
            raise GraphError(f"%{n.name} on {here} reads %{i} which lives on {','.join(src)}: "
                             f"insert a copy or a collective")
