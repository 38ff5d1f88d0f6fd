"""A builder that infers each node's spec as it is emitted."""

from __future__ import annotations

from typing import Any

from graphir.graph import Graph, GraphError, Node
from graphir.ops import LEAVES, Op, ShapeError, infer_results
from graphir.spec import TensorSpec


class Builder:
    """Emit nodes in program order; names must be unique; specs are inferred (leaves given)."""

    def __init__(self, device: str | None = None) -> None:
        self._nodes: list[Node] = []
        self._index: dict[str, Node] = {}
        self.device = device  # default device for emitted nodes (placement passes use it)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def spec(self, name: str) -> TensorSpec:
        return self._index[name].spec

    def node(self, name: str) -> Node:
        return self._index[name]

    def add(self, node: Node) -> str:
        """Append an existing node (passes copy nodes through unchanged)."""
        if node.name in self._index:
            raise GraphError(f"duplicate node name %{node.name}")
        self._nodes.append(node)
        self._index[node.name] = node
        return node.name

    def leaf(self, op: Op, name: str, spec: TensorSpec, device: str | None = None, **attrs: Any) -> str:
        if op not in LEAVES:
            raise GraphError(f"{op.value} is not a leaf op")
        return self.add(Node(name, op, (), spec, tuple(attrs.items()), device or self.device))

    def emit(self, op: Op, name: str, *inputs: str, device: str | None = None, **attrs: Any) -> str:
        attrs = {k: v for k, v in attrs.items() if v is not None}
        try:
            missing = [i for i in inputs if i not in self._index]
            if missing:
                raise ShapeError(f"unknown input(s) {', '.join('%' + m for m in missing)}")
            specs = infer_results(op, [self._index[i].results for i in inputs], attrs)
        except ShapeError as e:
            raise GraphError(f"%{name} ({op.value}): {e}") from None
        return self.add(Node(name, op, tuple(inputs), specs[0], tuple(attrs.items()), device or self.device,
                             specs[1:]))

    def graph(self, **meta: Any) -> Graph:
        return Graph(tuple(self._nodes), tuple(meta.items()))
