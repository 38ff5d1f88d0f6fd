"""A small node collector for passes: program order, unique names, specs inferred as nodes
are emitted (graphir.ops.infer is memoised, so rebuilding a 48-layer model stays cheap)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from graphir.graph import Graph, GraphError, Node, freeze_attrs
from graphir.ops import Op, ShapeError, infer_results
from graphir.spec import TensorSpec


class Emitter:
    """Nodes in program order; `emit` infers the spec from the inputs already collected."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.index: dict[str, Node] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def add(self, node: Node) -> str:
        if node.name in self.index:
            raise GraphError(f"duplicate node name %{node.name}")
        self.nodes.append(node)
        self.index[node.name] = node
        return node.name

    def emit(self, name: str, op: Op, inputs: Sequence[str], attrs: Mapping[str, Any] | tuple[tuple[str, Any], ...],
             device: str | None) -> str:
        # a node's own attrs are already frozen and sorted: skip re-freezing them
        fa = attrs if isinstance(attrs, tuple) else freeze_attrs(attrs)
        try:
            specs = infer_results(op, [self.index[i].results for i in inputs], dict(fa))
        except ShapeError as e:
            raise GraphError(f"%{name} ({op.value}): {e}") from None
        return self.add(Node(name, op, tuple(inputs), specs[0], fa, device, specs[1:]))

    def leaf(self, name: str, op: Op, spec: TensorSpec, attrs: Mapping[str, Any], device: str | None) -> str:
        return self.add(Node(name, op, (), spec, freeze_attrs(attrs), device))

    def graph(self, meta: tuple[tuple[str, Any], ...], **extra: Any) -> Graph:
        m = dict(meta)
        m.update(extra)
        return Graph(tuple(self.nodes), tuple(m.items()))


def suffix(name: str, j: int) -> str:
    """The per-device piece of a node: `blk.3.attn_q` -> `blk.3.attn_q#1`."""
    return f"{name}#{j}"


def base_name(name: str) -> tuple[str, str]:
    """Split a piece name into (base, device suffix incl. '#'): `blk.3.attn_q#1` -> ('blk.3.attn_q', '#1')."""
    k = name.find("#")
    return (name, "") if k < 0 else (name[:k], name[k:])
