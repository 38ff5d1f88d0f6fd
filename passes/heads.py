"""`contiguous_heads`: reorder a projection's weight rows so the pieces read from its result are
contiguous column ranges.

Models interleave per-head pieces in one projection: Qwen3-Next's delta-net input projection
is, per key head, `[q | k | v | z]`, and its attention query projection is, per head,
`[q | gate]`. The graph takes them apart with a reshape to heads, slices, and reshapes back:

    %blk.0.qkvz_heads = reshape(%blk.0.ssm_in) {shape=[T, 16, 768]}
    %blk.0.ssm_q = reshape(slice(%blk.0.qkvz_heads) {dim=2, start=0, stop=128}) {shape=[T, 2048]}
    ... k, v, z; then %blk.0.conv_x = concat(%blk.0.ssm_q, %blk.0.ssm_k, %blk.0.ssm_v)

Each reshape of a strided slice is a copy on every backend, and the concat another: seven
kernels a layer in a decode step, for a few KB each. Permuting the rows of the weight (a
load-time constant) permutes the product's columns, so the same values come out of one matmul
already grouped: every piece becomes a slice of the result (a view), and a concat of pieces
that are now adjacent becomes one slice. The result is exact: each output column is the same
row of the same weight times the same activation.

The pass follows the column each value holds through `slice`, `reshape` and `concat` nodes
(index arrays over the non-token dims), so it does not know any model: it applies wherever a
matmul's result is only read through such views and the pieces read are disjoint. The new
weight is expressed with `slice`/`reshape`/`concat` of the old one (weight-only nodes, folded
at load, free for the cost model). It runs after placement and after the merges (it takes the
merged `ssm_in_ba` and `attn_qkv` as they are).
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass

import numpy as np

from graphir import dims as D
from graphir.graph import Graph, Node, constants
from graphir.ops import Op

from passes.emit import Emitter, base_name

_VIEWS = (Op.SLICE, Op.RESHAPE, Op.CONCAT)


@dataclass(frozen=True)
class _Plan:
    matmul: Node
    dropped: frozenset[str]  # the view nodes the rewrite replaces (terminals included)
    terminals: tuple[tuple[Node, np.ndarray], ...]  # (node, its columns flattened), program order


def contiguous_heads(g: Graph) -> Graph:
    """Permute projection weights so the per-head pieces read from the product are views."""
    const = constants(g)
    plans = [p for n in g.nodes if n.op == Op.MATMUL and n.inputs[1] in const
             for p in [_plan(g, n)] if p is not None]
    if not plans:
        return g
    by_matmul = {p.matmul.name: p for p in plans}
    dropped = set().union(*(p.dropped for p in plans))
    em = Emitter()
    for n in g.nodes:
        if n.name in by_matmul:
            _emit(em, g, by_matmul[n.name])
        elif n.name not in dropped:
            em.add(n)
    return Graph(tuple(em.nodes), g.meta)


def _plan(g: Graph, m: Node) -> _Plan | None:
    """Which columns each view of m's result holds; None when the rewrite gains nothing or
    cannot apply (the whole product is read, pieces overlap, a view crosses devices)."""
    if m.spec.rank != 2 or not isinstance(m.spec.shape[1], int):
        return None
    lead = D.dim(m.spec.shape[0])
    pos = {n.name: k for k, n in enumerate(g.nodes)}
    cols: dict[str, np.ndarray] = {m.name: np.arange(m.spec.shape[1])}  # [cols of this value]
    heap = [(pos[u], u) for u in g.users.get(m.name, ())]
    heapq.heapify(heap)
    seen: set[str] = set()
    while heap:  # program order: a concat's derived inputs are known before it
        _, name = heapq.heappop(heap)
        if name in seen:
            continue
        seen.add(name)
        c = _columns(g[name], cols, lead, m.device)
        if c is not None:
            cols[name] = c
            for u in g.users.get(name, ()):
                heapq.heappush(heap, (pos[u], u))
    derived = set(cols) - {m.name}
    if not derived or any(u not in derived for u in g.users.get(m.name, ())):
        return None  # the whole product is read somewhere: its column order must stay
    terminals = [g[n] for n in sorted(derived, key=pos.__getitem__)
                 if not g.users.get(n) or any(u not in derived for u in g.users[n])]
    flat = [cols[t.name].reshape(-1) for t in terminals]
    used = np.concatenate(flat)
    if len(np.unique(used)) != len(used):
        return None  # two pieces share columns: one order cannot make both contiguous
    concats = any(g[n].op == Op.CONCAT for n in derived)
    if not concats and all(_is_range(f) for f in flat):
        return None  # every piece is already a view
    return _Plan(m, frozenset(derived), tuple(zip(terminals, flat)))


def _columns(n: Node, cols: dict[str, np.ndarray], lead: object, device: str | None) -> np.ndarray | None:
    """The product columns node n holds, if n is a view of them on the same device."""
    if n.op not in _VIEWS or n.device != device or not all(i in cols for i in n.inputs):
        return None
    a = n.attr
    if n.op == Op.SLICE:
        dim, start, stop = int(a["dim"]), a["start"], a["stop"]
        if dim < 1 or not isinstance(start, int) or not isinstance(stop, int):
            return None
        return np.take(cols[n.inputs[0]], np.arange(start, stop), axis=dim - 1)
    if n.op == Op.RESHAPE:
        shape = n.spec.shape
        if D.dim(shape[0]) != lead or not all(isinstance(s, int) for s in shape[1:]):
            return None  # only the non-token dims may be regrouped
        src = cols[n.inputs[0]]
        rest = tuple(int(s) for s in shape[1:])
        return src.reshape(rest) if int(np.prod(rest)) == src.size else None
    dim = int(a["dim"])  # concat
    if dim < 1:
        return None
    parts = [cols[i] for i in n.inputs]
    if any(p.ndim != parts[0].ndim for p in parts):
        return None
    return np.concatenate(parts, axis=dim - 1)


def _is_range(f: np.ndarray) -> bool:
    return bool(len(f) == 0 or (np.diff(f) == 1).all())


def _emit(em: Emitter, g: Graph, p: _Plan) -> None:
    m = p.matmul
    w = g[m.inputs[1]]
    perm = np.concatenate([f for _, f in p.terminals])
    tag = hashlib.sha1(perm.astype(np.int64).tobytes()).hexdigest()[:8]  # same layout, same constant
    base, tail = base_name(w.name)
    new_w = _weight(em, w, perm, f"{base}.heads_{tag}", tail)
    em.emit(m.name, Op.MATMUL, [m.inputs[0], new_w], m.attrs, m.device)
    start = 0
    for t, f in p.terminals:
        stop = start + len(f)
        if t.spec.rank == 2 and t.spec.shape[1] == len(f):
            em.emit(t.name, Op.SLICE, [m.name], {"dim": 1, "start": start, "stop": stop}, t.device)
        else:
            s = em.emit(f"{base_name(t.name)[0]}.cols{base_name(t.name)[1]}", Op.SLICE, [m.name],
                        {"dim": 1, "start": start, "stop": stop}, t.device)
            em.emit(t.name, Op.RESHAPE, [s], {"shape": tuple(t.spec.shape)}, t.device)
        start = stop


def _segments(perm: np.ndarray) -> list[tuple[int, int, int, int]]:
    """perm as (base, stride, width, groups) runs: rows base + h*stride + j, h < groups, j < width."""
    out: list[tuple[int, int, int, int]] = []
    i, n = 0, len(perm)
    while i < n:
        w = 1
        while i + w < n and perm[i + w] == perm[i] + w:
            w += 1
        groups, stride = 1, w
        if i + w < n:
            stride = int(perm[i + w] - perm[i])
            while (i + (groups + 1) * w <= n and stride >= w
                   and (perm[i + groups * w:i + (groups + 1) * w] == perm[i] + groups * stride + np.arange(w)).all()):
                groups += 1
        if groups == 1:
            stride = w
        out.append((int(perm[i]), stride, w, groups))
        i += groups * w
    return out


def _weight(em: Emitter, w: Node, perm: np.ndarray, name: str, tail: str) -> str:
    """Rows `perm` of weight w ([rows, in]) as weight-only nodes: per run of heads, a slice of
    the rows they span, reshaped to [heads, stride, in], sliced to the piece, reshaped back."""
    rows, k = int(w.spec.shape[0]), w.spec.shape[1]
    pieces: list[str] = []
    count = [0]

    def node(op: Op, inputs: list[str], attrs: dict) -> str:
        # numbered within this weight: the prefill and decode graphs name (and share) the same constants
        count[0] += 1
        return em.emit(f"{name}.{count[0]}{tail}", op, inputs, attrs, w.device)

    def rows_slice(src: str, a: int, b: int) -> str:
        return src if (a, b) == (0, rows) else node(Op.SLICE, [src], {"dim": 0, "start": a, "stop": b})

    for b, stride, width, groups in _segments(perm):
        off = min(b, stride - width)
        r0 = b - off
        if groups == 1:
            pieces.append(rows_slice(w.name, b, b + width))
        elif r0 + groups * stride <= rows:
            region = rows_slice(w.name, r0, r0 + groups * stride)
            heads = node(Op.RESHAPE, [region], {"shape": (groups, stride, k)})
            cut = node(Op.SLICE, [heads], {"dim": 1, "start": off, "stop": off + width})
            pieces.append(node(Op.RESHAPE, [cut], {"shape": (groups * width, k)}))
        else:  # the last head's stride runs past the end: one slice per head
            pieces += [rows_slice(w.name, b + h * stride, b + h * stride + width) for h in range(groups)]
    if len(pieces) == 1:
        return pieces[0]
    return em.emit(name + tail, Op.CONCAT, pieces, {"dim": 0}, w.device)
