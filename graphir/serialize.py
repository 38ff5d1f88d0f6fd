"""JSON round-trip, networkx and Graphviz dot views of a graph."""

from __future__ import annotations

import json
from typing import Any

from graphir.graph import Graph, Node
from graphir.ops import Op
from graphir.spec import TensorSpec


def _jsonable(v: Any) -> Any:
    return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def node_to_dict(n: Node) -> dict[str, Any]:
    d: dict[str, Any] = {"name": n.name, "op": n.op.value, "inputs": list(n.inputs),
                         "dtype": n.spec.dtype.name, "shape": list(n.spec.shape)}
    if n.attrs:
        # a list of pairs keeps float/int distinctions and order exactly
        d["attrs"] = [[k, _jsonable(v)] for k, v in n.attrs]
    if n.device:
        d["device"] = n.device
    if n.outs:  # results 1.. of a fused op with several
        d["results"] = [{"dtype": r.dtype.name, "shape": list(r.shape)} for r in n.outs]
    return d


def to_json(g: Graph, indent: int | None = None) -> str:
    doc = {"format": "graphir", "version": 1, "meta": [[k, _jsonable(v)] for k, v in g.meta],
           "nodes": [node_to_dict(n) for n in g.nodes]}
    return json.dumps(doc, indent=indent)


def from_json(text: str) -> Graph:
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != "graphir":
        raise ValueError("not a graphir JSON document")
    nodes = [Node(d["name"], Op(d["op"]), tuple(d["inputs"]), TensorSpec(tuple(d["shape"]), d["dtype"]),
                  tuple((k, _tupled(v)) for k, v in d.get("attrs", [])), d.get("device"),
                  tuple(TensorSpec(tuple(r["shape"]), r["dtype"]) for r in d.get("results", [])))
             for d in doc["nodes"]]
    return Graph(tuple(nodes), tuple((k, _tupled(v)) for k, v in doc.get("meta", [])))


def to_networkx(g: Graph) -> Any:
    """A networkx.MultiDiGraph: node attributes op/spec/device/layer, edges in input order."""
    import networkx as nx

    G = nx.MultiDiGraph(**dict(g.meta))
    for n in g.nodes:
        G.add_node(n.name, op=n.op.value, spec=", ".join(map(str, n.results)), device=n.device, layer=n.layer,
                   attrs=dict(n.attrs))
        for pos, i in enumerate(n.inputs):
            G.add_edge(i, n.name, index=pos, spec=str(g[i].spec))
    return G


_LEAF_STYLE = {Op.WEIGHT: "note", Op.INPUT: "invhouse", Op.STATE_IN: "cylinder"}


def to_dot(g: Graph, weights: bool = False) -> str:
    """Graphviz source of the op graph; weights hidden unless asked (they double the size)."""
    lines = ["digraph graphir {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];']
    shown = {n.name for n in g.nodes if weights or n.op != Op.WEIGHT}
    for n in g.nodes:
        if n.name not in shown:
            continue
        shape = _LEAF_STYLE.get(n.op, "box")
        dev = f"\\n@{n.device}" if n.device else ""
        specs = ", ".join(map(str, n.results))
        lines.append(f'  "{n.name}" [shape={shape}, label="{n.name}\\n{n.op.value} {specs}{dev}"];')
    for n in g.nodes:
        for i in n.inputs:
            if i in shown and n.name in shown:
                lines.append(f'  "{i}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
