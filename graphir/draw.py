"""Drawings of placed graphs: a layer view for whole models and an op view for a few layers.

Layer view: one box per (layer, part, device) — part is the mixer (attention or delta-net)
or the FFN/MoE — so a 48-layer model stays at a few boxes per layer. Copies become edges and
all-reduces small diamonds, labelled with the bytes they move per token. Op view: a cluster
per layer, nodes coloured by device, collectives highlighted, shapes on edges.
Both produce Graphviz source; `render()` turns it into SVG or PNG through the `dot` program.
"""

from __future__ import annotations

from collections import defaultdict

from graphir.graph import Graph, Node
from graphir.ops import LEAVES, Op

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
LIGHT = ("#DCE6F2", "#F9E2D2", "#DDEFE1", "#F3DADB", "#E5E1F0", "#EBE3DC", "#F7E3F1", "#E6E6E6")

_MIXER = ("attn", "kq", "kqv", "q_", "k_", "v_", "cache", "ssm", "conv", "delta", "qkvz", "ba_", "qg_", "gate_heads")


def device_colors(g: Graph) -> dict[str, int]:
    return {d: i % len(PALETTE) for i, d in enumerate(g.device_list())}


def _bytes_per_token(n: Node) -> int:
    return n.spec.nbytes_at({"T": 1, "KV": 0})


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def part_of(n: Node) -> str:
    """Which part of the model a node belongs to: embed, head, or L{i}.mix / L{i}.ffn."""
    if n.layer is None:
        return "head" if n.name.startswith(("output", "result", "logits")) else "embed"
    role = n.name.split(".", 2)[2] if n.name.count(".") >= 2 else ""
    mixer = role.startswith(_MIXER) and not role.startswith("attn_residual") or role.startswith("attn_norm")
    return f"L{n.layer}.{'mix' if mixer else 'ffn'}"


def _kind(g: Graph, members: list[Node]) -> str:
    ops = {n.op for n in members}
    if Op.DELTA_NET in ops:
        return "delta-net"
    if Op.ATTENTION in ops:
        return "attention"
    if Op.MOE_MATMUL in ops:
        return "MoE"
    if Op.MATMUL in ops:
        return "FFN"
    return "norm/add"


def layer_view(g: Graph, title: str = "") -> str:
    """Graphviz source of the layer view (one box per layer part and device)."""
    colors = device_colors(g)
    boxes: dict[tuple[str, str], list[Node]] = defaultdict(list)
    where: dict[str, tuple[str, str]] = {}
    collectives: list[Node] = []
    for n in g.nodes:
        if n.op == Op.ALL_REDUCE:
            collectives.append(n)
            continue
        dev = n.devices[0] if n.devices else "-"
        key = (part_of(n), dev)
        boxes[key].append(n)
        where[n.name] = key
    ids = {key: f"b{i}" for i, key in enumerate(boxes)}
    lines = ["digraph layers {", "  rankdir=LR; newrank=true;", '  node [fontname="Helvetica", fontsize=9];',
             '  edge [fontname="Helvetica", fontsize=8];']
    if title:
        lines.append(f'  labelloc=t; label="{title}";')
    for key, members in boxes.items():
        part, dev = key
        compute = [m for m in members if m.op not in LEAVES and m.op != Op.COPY]
        if not compute and all(m.op in LEAVES for m in members):
            continue
        wbytes = sum(m.spec.nbytes_at({}) for m in members if m.op == Op.WEIGHT)
        c = colors.get(dev, 7)
        label = f"{part} {_kind(g, members)}\\n{dev}  {len(compute)} ops\\nweights {_fmt_bytes(wbytes)}"
        lines.append(f'  {ids[key]} [shape=box, style="filled,rounded", fillcolor="{LIGHT[c]}", '
                     f'color="{PALETTE[c]}", label="{label}"];')
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for n in g.nodes:
        if n.op == Op.ALL_REDUCE:
            continue
        dst = where[n.name]
        for i in n.inputs:
            src = where.get(i)
            if src is None or src == dst:
                continue
            if g[i].op in LEAVES:
                continue
            edges[(ids[src], ids[dst])] += _bytes_per_token(g[i]) if n.op == Op.COPY else 0
    for k, n in enumerate(collectives):
        cid = f"c{k}"
        dt = n.attr.get("dtype", n.spec.dtype.name)
        lines.append(f'  {cid} [shape=diamond, style=filled, fillcolor="#FFD966", color="#B8860B", '
                     f'label="all_reduce\\n{_fmt_bytes(_bytes_per_token(n))}/tok {dt}"];')
        for i in n.inputs:
            src = where.get(i)
            if src is not None:
                lines.append(f"  {ids[src]} -> {cid};")
        for u in g.users.get(n.name, ()):
            dst = where.get(u)
            if dst is not None:
                edges.setdefault((cid, ids[dst]), 0)
    for (a, b), nbytes in edges.items():
        label = f' [label="{_fmt_bytes(nbytes)}/tok", color="#B22222", penwidth=1.5]' if nbytes else ""
        lines.append(f"  {a} -> {b}{label};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def op_view(g: Graph, layers: range | None = None, weights: bool = False) -> str:
    """Graphviz source of the op view: a cluster per layer, colour by device."""
    colors = device_colors(g)
    keep = [n for n in g.nodes if (layers is None or n.layer in layers or n.layer is None and layers is None)
            and (weights or n.op != Op.WEIGHT)]
    names = {n.name for n in keep}
    by_layer: dict[int | None, list[Node]] = defaultdict(list)
    for n in keep:
        by_layer[n.layer].append(n)
    lines = ["digraph ops {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=8, shape=box, style=filled];',
             '  edge [fontname="Helvetica", fontsize=7];']
    for layer, members in by_layer.items():
        if layer is not None:
            lines.append(f'  subgraph cluster_{layer} {{ label="blk.{layer}"; color="#999999";')
        for n in members:
            if n.op == Op.ALL_REDUCE:
                style = 'shape=doubleoctagon, fillcolor="#FFD966", color="#B8860B", penwidth=2'
            elif n.op == Op.COPY:
                style = 'shape=cds, fillcolor="#F4CCCC", color="#B22222", penwidth=2'
            else:
                c = colors.get(n.devices[0], 7) if n.devices else 7
                style = f'fillcolor="{LIGHT[c]}", color="{PALETTE[c]}"'
            lines.append(f'    "{n.name}" [{style}, label="{n.name}\\n{n.op.value}"];')
        if layer is not None:
            lines.append("  }")
    for n in keep:
        for i in n.inputs:
            if i in names:
                lines.append(f'  "{i}" -> "{n.name}" [label="{g[i].spec}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_source: str, fmt: str) -> bytes:
    """SVG or PNG bytes from Graphviz source (needs the `dot` program)."""
    import graphviz

    return graphviz.Source(dot_source).pipe(format=fmt)
