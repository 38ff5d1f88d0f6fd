"""Drawings of placed graphs: a layer view for whole models and an op view for a few layers.

Layer view (`layer_view`): one row per layer, one column per device. A row has two boxes per
device, the mixer (attention or delta-net) above the FFN/MoE, so a 48-layer model stays at a
few boxes per layer. All-reduces are gold diamonds between the device columns, labelled with
the bytes they move per token; copies are red arrows labelled the same way; grey arrows are
the order of work on one device; a dashed box is a device waiting while another works on that
part of the layer. Long models wrap into side-by-side bands of rows, like newspaper columns,
so the picture stays about as wide as it is tall. Positions are computed here and pinned
(Graphviz `neato`), because a grid is what makes 48 layers readable and dot's own ranking
would scatter it.

Op view (`op_view`): a cluster per layer with a sub-cluster per device, nodes coloured by
device, copies and all-reduces highlighted, shapes on edges; values from outside the chosen
layers appear as dashed inputs.

Both return Graphviz source; `render()` turns it into SVG or PNG through the `dot` program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from graphir.errors import GraphirError
from graphir.graph import Graph, Node
from graphir.ops import DEFS, LEAVES, VIEWS, Op

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
LIGHT = ("#DCE6F2", "#F9E2D2", "#DDEFE1", "#F3DADB", "#E5E1F0", "#EBE3DC", "#F7E3F1", "#E6E6E6")
AR_FILL, AR_LINE, COPY_LINE, FLOW_LINE = "#FFD966", "#B8860B", "#C0392B", "#9A9A9A"
FONT = "Helvetica"

# layer-view geometry, in points (1/72 inch)
BOX_W, BOX_H = 168, 20
SUB = 26  # mixer row -> FFN row of one layer
ROW = 60  # layer -> layer
GAP = 104  # between device columns: room for a diamond and its label
LABEL_W = 52  # row labels left of the first column
BAND_SEP = 70  # between bands


def device_colors(g: Graph) -> dict[str, int]:
    """Palette index per device, in the graph's device order."""
    return {d: i % len(PALETTE) for i, d in enumerate(g.device_list())}


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}".replace(".0 ", " ")
        b /= 1024
    return f"{b:.1f} GiB"


def bytes_per_token(n: Node) -> int:
    """What a copy or all-reduce moves per token of the micro-batch (at the IR's types)."""
    if n.op == Op.ALL_REDUCE and "dtype" in n.attr:
        return n.spec.with_dtype(str(n.attr["dtype"])).nbytes_at({"T": 1, "KV": 0})
    return n.spec.nbytes_at({"T": 1, "KV": 0})


def parts(g: Graph) -> dict[str, str]:
    """Part of the model per node: `embed`, `head`, `L{i}.mix` or `L{i}.ffn`.

    By position: a layer's mixer is everything up to its last `attn_residual` piece (the
    mixer region's exit, also the all-reduce's name), the rest is the FFN. Position, not name,
    because pieces, copies and merged weights carry names no prefix list can anticipate."""
    out: dict[str, str] = {}
    exits: dict[int, int] = {}
    last = -1  # position of the last layer node: outside-layer nodes after it are the head
    for pos, n in enumerate(g.nodes):
        if n.layer is not None:
            last = pos
            if n.name.split(".", 2)[-1].split("#")[0] == "attn_residual":
                exits[n.layer] = pos
    for pos, n in enumerate(g.nodes):
        i = n.layer
        if i is None:  # inputs copied to another device (positions) sit between layers: embed
            out[n.name] = "head" if pos > last >= 0 else "embed"
        else:
            out[n.name] = f"L{i}.{'mix' if pos <= exits.get(i, -1) else 'ffn'}"
    return out


def _kind(members: list[Node], part: str) -> str:
    ops = {n.op for n in members}
    for op, name in ((Op.DELTA_NET, "delta-net"), (Op.ATTENTION, "attention"), (Op.MOE_MATMUL, "MoE"),
                     (Op.GET_ROWS, "embed")):
        if op in ops:
            return name
    if part == "head":
        return "head"
    return "FFN" if Op.MATMUL in ops else "norm/add"


@dataclass
class Box:
    part: str  # embed | head | L{i}.mix | L{i}.ffn
    device: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def layer(self) -> int | None:
        return int(self.part[1:].split(".")[0]) if self.part.startswith("L") else None

    @property
    def slot(self) -> str:
        return self.part.split(".")[-1]  # embed | head | mix | ffn

    @property
    def launches(self) -> int:
        return sum(DEFS[n.op].launches for n in self.nodes if n.op not in (Op.OUTPUT, Op.COPY))

    @property
    def weight_bytes(self) -> int:
        return sum(n.spec.nbytes_at({}) for n in self.nodes if n.op == Op.WEIGHT)

    @property
    def kind(self) -> str:
        return _kind(self.nodes, self.slot)


@dataclass(frozen=True)
class Summary:
    """The layer view as data: boxes, collectives and copies, and grey order edges."""
    boxes: dict[tuple[str, str], Box]  # (part, device) -> box, in program order
    collectives: list[tuple[Node, str, list[tuple[str, str]]]]  # (node, part, participant boxes)
    copies: list[tuple[Node, tuple[str, str], tuple[str, str]]]  # (node, source box, first reader box)
    flows: list[tuple[tuple[str, str], tuple[str, str]]]  # same-device order edges


def summarize(g: Graph) -> Summary:
    """Group a placed graph into boxes and the transfers between them (an analysis)."""
    part = parts(g)
    boxes: dict[tuple[str, str], Box] = {}
    where: dict[str, tuple[str, str]] = {}  # value -> box holding it (through views)
    for n in g.nodes:
        if n.op in (Op.ALL_REDUCE, Op.COPY) or not n.devices:
            continue
        key = (part[n.name], n.devices[0])
        boxes.setdefault(key, Box(*key)).nodes.append(n)
        where[n.name] = key
    # a box of leaves only (a weight replica waiting for its reader) draws nothing
    boxes = {k: b for k, b in boxes.items() if any(m.op not in LEAVES for m in b.nodes)}
    collectives, copies, flows = [], [], []
    ar_src: dict[str, dict[str, tuple[str, str]]] = {}  # all-reduce -> device -> partial's box
    for n in g.nodes:
        if n.op == Op.ALL_REDUCE:
            src = {g[i].devices[0]: where[i] for i in n.inputs if where.get(i) in boxes}
            ar_src[n.name] = src
            collectives.append((n, part[n.name], list(src.values())))
    for n in g.nodes:
        if n.op == Op.COPY:
            readers = [where[u] for u in g.users.get(n.name, ()) if where.get(u) in boxes]
            v = g[n.inputs[0]]
            if v.op in LEAVES:  # an input (positions) sent to another device: drawn in the embed row
                if ("embed", v.devices[0]) in boxes:
                    copies.append((n, ("embed", v.devices[0]), (f"input:{v.name}", n.devices[0])))
            elif readers and where.get(v.name) in boxes:
                copies.append((n, where[v.name], readers[0]))
            continue
        dst = where.get(n.name)
        if dst not in boxes or n.op == Op.ALL_REDUCE:
            continue
        for i in n.inputs:
            if g[i].op in LEAVES:
                continue  # weights, caches and inputs are not work another box did
            src = ar_src.get(i, {}).get(dst[1]) if i in ar_src else where.get(i)
            if src in boxes and src != dst and src[1] == dst[1] and (src, dst) not in flows:
                flows.append((src, dst))
    return Summary(boxes, collectives, copies, flows)


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def box_id(part: str, device: str) -> str:
    """A Graphviz id for a box: `b_L3_mix_cuda0` (tests count boxes by this prefix)."""
    return "b_" + "".join(c if c.isalnum() else "_" for c in f"{part}_{device}")


def _legend(s: Summary, colors: dict[str, int], waits: bool, part: bool) -> str:
    cells = ['<TD BORDER="0"><I>whole model:</I></TD>'] if part else []  # totals never depend on --layers
    for d, c in colors.items():
        mine = [b for (p, dev), b in s.boxes.items() if dev == d]
        w = sum(b.weight_bytes for b in mine)
        k = sum(b.launches for b in mine)
        cells.append(f'<TD BGCOLOR="{LIGHT[c]}" COLOR="{PALETTE[c]}" BORDER="1"><B>{_esc(d)}</B> '
                     f'{k} ops, {fmt_bytes(w)} weights</TD>')
    n_ar, n_cp = len(s.collectives), len(s.copies)
    if n_ar:
        cells.append(f'<TD BGCOLOR="{AR_FILL}" COLOR="{AR_LINE}" BORDER="1">&#9670; all-reduce x{n_ar} '
                     f'(bytes/token)</TD>')
    if n_cp:
        cells.append(f'<TD BORDER="0"><FONT COLOR="{COPY_LINE}">&#8594; copy x{n_cp} (bytes/token)</FONT></TD>')
    cells.append(f'<TD BORDER="0"><FONT COLOR="{FLOW_LINE}">&#8594; order on a device</FONT></TD>')
    if waits:
        cells.append('<TD BORDER="1" STYLE="dashed" COLOR="#BBBBBB"><FONT COLOR="#888888">device waits</FONT></TD>')
    return f'<<TABLE BORDER="0" CELLSPACING="4" CELLPADDING="3"><TR>{"".join(cells)}</TR></TABLE>>'


def default_title(g: Graph, layers: range | None = None) -> str:
    """`model · split S · devices · phase P · quant [· layers A:B]` from the graph's meta."""
    i = g.info
    bits = [str(i.get("model", "graph")), f"split {i['split']}" if i.get("split") else "",
            ", ".join(g.device_list()), f"phase {i['phase']}" if i.get("phase") else "", str(i.get("quant", "")),
            f"layers {layers.start}:{layers.stop}" if layers is not None else ""]
    return " · ".join(b for b in bits if b)


def _node(name: str, x: float, y: float, attrs: str) -> str:
    return f'  {name} [{attrs}, pos="{x:.0f},{y:.0f}!"];'


def layer_view(g: Graph, title: str = "", layers: range | None = None, bands: int | None = None) -> str:
    """Graphviz source of the layer view; `layers` limits the rows, `bands` sets the wrap."""
    if not g.placed:
        raise GraphirError("the layer view needs a placed graph (give --split or a placement pass)")
    s = summarize(g)
    colors = device_colors(g)
    devs = list(colors)
    last = max((b.layer for b in s.boxes.values() if b.layer is not None), default=-1)

    def wanted(b: Box) -> bool:
        if layers is None:
            return True
        if b.layer is not None:
            return b.layer in layers
        return b.slot == "embed" and 0 in layers or b.slot == "head" and last in layers

    keep = {k: b for k, b in s.boxes.items() if wanted(b)}
    rows = list(dict.fromkeys(p.split(".")[0] for p, _ in keep))  # embed, L0, L1, ..., head
    band_w = LABEL_W + len(devs) * BOX_W + (len(devs) - 1) * GAP + BAND_SEP
    # enough bands that the picture is about 1.4 times as wide as tall
    n_bands = bands or max(1, round(math.sqrt(1.4 * len(rows) * ROW / band_w)))
    per_band = max(1, math.ceil(len(rows) / max(1, n_bands)))
    n_bands = max(1, math.ceil(len(rows) / per_band))
    row_at = {r: divmod(k, per_band) for k, r in enumerate(rows)}

    def xy(row: str, slot: str, d: int) -> tuple[float, float]:
        band, r = row_at[row]
        return band * band_w + LABEL_W + BOX_W / 2 + d * (BOX_W + GAP), -(r * ROW + (SUB if slot == "ffn" else 0))

    size = f"width={BOX_W / 72:.3f}, height={BOX_H / 72:.3f}, fixedsize=true"
    body: list[str] = []
    pos: dict[tuple[str, str], tuple[float, float]] = {}
    for (p, dev), b in keep.items():
        x, y = pos[(p, dev)] = xy(p.split(".")[0], b.slot, devs.index(dev))
        c, w = colors[dev], f" · {fmt_bytes(b.weight_bytes)}" if b.weight_bytes else ""
        body.append(_node(box_id(p, dev), x, y, f'shape=box, style="filled,rounded", fillcolor="{LIGHT[c]}", '
                          f'color="{PALETTE[c]}", {size}, label="{b.kind} · {b.launches} ops{w}"'))
    waits = 0  # a device that works on one part of a layer but not the other waits meanwhile
    for row in (r for r in rows if r.startswith("L")):
        for d, dev in enumerate(devs):
            have = [slot for slot in ("mix", "ffn") if (f"{row}.{slot}", dev) in keep]
            if len(have) == 1:
                slot = "ffn" if have[0] == "mix" else "mix"
                waits += 1
                body.append(_node("w" + box_id(f"{row}.{slot}", dev)[1:], *xy(row, slot, d),
                                  f'shape=box, style="dashed,rounded", color="#BBBBBB", fontcolor="#999999", '
                                  f'{size}, label="waits"'))
    for a, b in s.flows:  # order edges stay within a band; the row labels carry the reader on
        if a in pos and b in pos and row_at[a[0].split(".")[0]][0] == row_at[b[0].split(".")[0]][0]:
            body.append(f'  {box_id(*a)} -> {box_id(*b)} [color="{FLOW_LINE}", arrowsize=0.5, '
                        f"tailport=s, headport=n];")
    for k, (n, p, members) in enumerate(s.collectives):
        members = [m for m in members if m in pos]
        if not members:
            continue
        first = min(devs.index(m[1]) for m in members)
        x, y = xy(p.split(".")[0], p.split(".")[-1], first)
        x += BOX_W / 2 + GAP / 2  # in the gap right of the first participant's column
        dt = str(n.attr.get("dtype", n.spec.dtype.name))
        body.append(_node(f"c{k}", x, y, f'shape=diamond, style=filled, fillcolor="{AR_FILL}", color="{AR_LINE}", '
                          f'fontsize=7, margin="0,0", height=0.26, width=0.95, fixedsize=true, '
                          f'label="{fmt_bytes(bytes_per_token(n))}/tok {dt}", tooltip="{n.name}"'))
        for m in members:
            left = pos[m][0] < x
            body.append(f'  {box_id(*m)} -> c{k} [dir=none, color="{AR_LINE}", penwidth=1.4, '
                        f'tailport={"e" if left else "w"}, headport={"w" if left else "e"}];')
    for n, a, b in s.copies:
        if b[0].startswith("input:") and "embed" in row_at:
            x, y = pos[b] = xy("embed", "embed", devs.index(b[1]))
            body.append(_node(box_id(*b), x, y, f'shape=plaintext, fontcolor="{COPY_LINE}", label="{b[0][6:]}"'))
        if a in pos and b in pos:
            right = pos[b][0] > pos[a][0]
            below = pos[b][1] < pos[a][1]  # into the corner nearest the gap, clear of the boxes
            port = ("nw" if right else "ne") if below else ("w" if right else "e")
            body.append(f'  {box_id(*a)} -> {box_id(*b)} [color="{COPY_LINE}", penwidth=1.2, arrowsize=0.6, '
                        f'fontcolor="{COPY_LINE}", tooltip="{n.name}", tailport={"e" if right else "w"}, '
                        f'headport={port}, label="{fmt_bytes(bytes_per_token(n))}/tok"];')
    top = ROW * 0.95
    head = ["digraph layers {", "  layout=neato; inputscale=72; splines=line; outputorder=edgesfirst;",
            f'  node [fontname="{FONT}", fontsize=8, margin="0.04,0.02"]; edge [fontname="{FONT}", fontsize=7];',
            f'  labelloc=t; fontname="{FONT}"; fontsize=13; label=<<B>{_esc(title or default_title(g, layers))}</B>>;',
            _node("legend", (n_bands * band_w - BAND_SEP) / 2, top + 26,
                  f"shape=plaintext, label={_legend(s, colors, waits > 0, layers is not None)}")]
    for band in range(n_bands):
        for d, dev in enumerate(devs):
            x = band * band_w + LABEL_W + BOX_W / 2 + d * (BOX_W + GAP)
            head.append(_node(f"h{band}_{d}", x, top * 0.55, f'shape=plaintext, fontsize=11, '
                              f'fontcolor="{PALETTE[colors[dev]]}", label=<<B>{_esc(dev)}</B>>'))
    for row in rows:
        band, r = row_at[row]
        head.append(_node(f"r_{row}", band * band_w + LABEL_W / 2 - 6, -(r * ROW + SUB / 2),
                          f'shape=plaintext, fontsize=9, label="{row.replace("L", "blk.") if row[0] == "L" else row}"'))
    return "\n".join(head + body + ["}"]) + "\n"


def op_view(g: Graph, layers: range | list[int] | None = None, weights: bool = False, title: str = "") -> str:
    """Graphviz source of the op view of `layers` (default: all): a cluster per layer and device."""
    colors = device_colors(g)
    chosen = set(layers) if layers is not None else None
    keep = [n for n in g.nodes if (chosen is None or n.layer in chosen) and (weights or n.op != Op.WEIGHT)]
    names = {n.name for n in keep}
    lines = ["digraph ops {", "  rankdir=TB; newrank=true; nodesep=0.15; ranksep=0.3;",
             f'  node [fontname="{FONT}", fontsize=8, shape=box, style="filled,rounded", height=0.25];',
             f'  edge [fontname="{FONT}", fontsize=6, fontcolor="#555555", color="#777777", arrowsize=0.5];']
    if title:
        lines.append(f'  labelloc=t; fontname="{FONT}"; fontsize=12; label=<<B>{_esc(title)}</B>>;')
    groups: dict[int | None, dict[str, list[Node]]] = {}
    for n in keep:
        dev = n.device if n.op != Op.ALL_REDUCE and n.device else "*"
        groups.setdefault(n.layer, {}).setdefault(dev, []).append(n)

    def style(n: Node) -> str:
        if n.op == Op.ALL_REDUCE:
            return f'shape=doubleoctagon, fillcolor="{AR_FILL}", color="{AR_LINE}", penwidth=2'
        if n.op == Op.COPY:
            return f'shape=cds, fillcolor="#F4CCCC", color="{COPY_LINE}", penwidth=2'
        c = colors.get(n.devices[0], 7) if n.devices else 7
        shape = {Op.STATE_IN: "cylinder", Op.OUTPUT: "invhouse", Op.WEIGHT: "note"}.get(
            n.op, "box" if n.op not in VIEWS else "box")
        extra = ', style="filled,dashed"' if n.op in VIEWS else ""
        return f'shape={shape}, fillcolor="{LIGHT[c]}", color="{PALETTE[c]}"{extra}'

    for k, (layer, by_dev) in enumerate(groups.items()):
        label = f"blk.{layer}" if layer is not None else "outside the layers"
        lines.append(f'  subgraph cluster_l{k} {{ label="{label}"; fontname="{FONT}"; fontsize=11; '
                     f'color="#999999"; style=rounded;')
        for j, (dev, members) in enumerate(by_dev.items()):
            sub = dev != "*" and len(by_dev) > 1
            if sub:
                c = colors.get(dev, 7)
                lines.append(f'    subgraph cluster_l{k}_d{j} {{ label="{dev}"; fontcolor="{PALETTE[c]}"; '
                             f'color="{PALETTE[c]}"; style="dashed,rounded";')
            for n in members:
                lines.append(f'      "{n.name}" [{style(n)}, label="{n.name}\\n{n.op.value}"];')
            if sub:
                lines.append("    }")
        lines.append("  }")
    outside: list[str] = []
    for n in keep:
        for i in n.inputs:
            if i not in names and g[i].op != Op.WEIGHT and i not in outside:
                outside.append(i)
    for i in outside:
        lines.append(f'  "{i}" [shape=box, style="dashed,rounded", color="#999999", fillcolor=white, '
                     f'fontcolor="#666666", label="{i}"];')
    for n in keep:
        for i in n.inputs:
            if i in names or i in outside:
                hot = n.op in (Op.COPY, Op.ALL_REDUCE)
                color = f', color="{COPY_LINE if n.op == Op.COPY else AR_LINE}", penwidth=1.5' if hot else ""
                lines.append(f'  "{i}" -> "{n.name}" [label="{g[i].spec}"{color}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_source: str, fmt: str) -> bytes:
    """SVG or PNG bytes from Graphviz source (needs the `dot` program)."""
    import graphviz

    if fmt not in ("svg", "png"):
        raise GraphirError(f"can render svg or png, not {fmt!r}")
    try:
        return graphviz.Source(dot_source).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise GraphirError("drawing SVG/PNG needs Graphviz's `dot` program; write .dot instead") from None
