"""Price a placed graph once: per-node work as coefficients (constant + linear in KV) and the
schedule skeleton (per-device segments between synchronisation points).

Every dim is linear in T and KV, so each node's work is exactly w(KV) = w0 + w1·KV for a fixed
T: evaluating the rules at KV=0 and KV=1 gives both coefficients. A sliding-window attention
grows only up to its window: w0 + w1·min(KV, cap), with the cap its rule states. A whole depth sweep is then a
few numpy expressions (costing.py) and a walk over the few hundred synchronisation events
(timeline.py), not a walk over thousands of nodes per depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.costmodel.rules import Work, work
from graphir.errors import GraphirError
from graphir.graph import Graph, Node, constants
from graphir.ops import LEAVES, VIEWS, Op

KINDS = ("gemm", "attn", "recurrent", "vector")


class PriceError(GraphirError):
    """A graph the cost model cannot price (not placed, no T binding)."""


@dataclass(frozen=True)
class Event:
    kind: str  # seg | copy | allreduce
    index: int  # segment id, or comm id
    devices: tuple[int, ...]  # seg: (dev,); copy: (dst,); allreduce: group
    src: int = -1  # copy: snapshot id of the value copied (-1: a leaf, ready at 0)
    snap: int = -1  # snapshot id this event records afterwards (-1: none)


@dataclass(frozen=True)
class Priced:
    """A placed graph with its symbols bound except KV; arrays are per compute node."""
    phase: str
    tokens: int
    devices: tuple[str, ...]
    names: tuple[str, ...]  # compute nodes, ordered by segment
    ops: tuple[str, ...]  # their ops (Op.value), for an engine's kernels-per-op table
    dev: np.ndarray
    kind: np.ndarray  # index into KINDS
    flops: np.ndarray  # [2, N]: constant, per KV token
    wbytes: np.ndarray  # [N]
    kvbytes: np.ndarray  # [2, N]
    actbytes: np.ndarray  # [2, N]
    launches: np.ndarray
    host_nodes: np.ndarray  # [N] graph nodes the executor's host walks for this one (free ones before it)
    mnk: np.ndarray  # [3, N] GEMM shape
    kv_cap: np.ndarray  # [N] cached tokens past which a node's work stops growing (inf: never)
    # [4, N] expert matmuls: experts, slots per token, shared slots, and 1 where the node routes
    # its tokens itself (0 where an earlier one on the device read the same activations and
    # routing: ik's fused up/gate routes once); all 0 for other nodes
    moe: np.ndarray
    wdtype: tuple[str, ...]  # per node ('' if none)
    seg_start: np.ndarray  # first node of each segment (for np.add.reduceat)
    seg_dev: np.ndarray
    comm_kind: tuple[str, ...]  # per comm node: copy | allreduce
    comm_numel: np.ndarray
    comm_elem: np.ndarray
    comm_launches: np.ndarray  # kernels per participant: the transfer, plus casts of a typed reduce
    comm_tokens: np.ndarray
    comm_group: tuple[tuple[int, ...], ...]
    events: tuple[Event, ...]
    n_snaps: int
    meta: tuple[tuple[str, Any], ...] = ()
    comm_names: tuple[str, ...] = ()  # per comm node, for timeline traces (Gantt charts)

    def kv(self, kv: np.ndarray) -> np.ndarray:
        """[N, D]: the cache depth each node's work sees at depths `kv` (capped by its window)."""
        return np.minimum(kv[None, :], self.kv_cap[:, None])

    @property
    def n_comm(self) -> int:
        return len(self.comm_kind)


def _producer(g: Graph, name: str) -> str | None:
    """The node whose kernel makes `name` (through views); None for leaves."""
    n = g[name]
    while n.op in VIEWS:
        n = g[n.inputs[0]]
    return None if n.op in LEAVES else n.name


def _tokens(g: Graph, tokens: int | None) -> int:
    phase = g.info.get("phase", "pp")
    if phase == "tg":
        return 1
    if tokens is None:
        raise PriceError("a pp graph needs the u-batch size (tokens) to be priced")
    return int(tokens)


def _made_by(g: Graph, name: str) -> Node:
    """The node that made value `name`, as rules see their inputs: a `result` view is its fused
    producer with that result's spec (a matmul's ids still name the top-k that chose them)."""
    n = g[name]
    if n.op != Op.RESULT:
        return n
    return g[n.inputs[0]].with_(spec=n.spec, outs=())


def price(g: Graph, tokens: int | None = None) -> Priced:
    """Price placed graph `g` with T bound to `tokens` (1 for a tg graph)."""
    T = _tokens(g, tokens)
    devices = g.device_list()
    if not g.placed:
        bad = next(n.name for n in g.nodes if not n.device)
        raise PriceError(f"graph is not placed: %{bad} has no device")
    dix = {d: i for i, d in enumerate(devices)}
    feeds: set[str] = set()
    for n in g.nodes:
        if n.op in (Op.COPY, Op.ALL_REDUCE):
            for i in n.inputs:
                p = _producer(g, i)
                if p is not None:
                    feeds.add(p)
    env0, env1 = {"T": T, "KV": 0}, {"T": T, "KV": 1}
    rows: list[tuple[Node, Work, Work]] = []
    segs: list[list[int]] = []
    seg_dev: list[int] = []
    pending: dict[int, list[int]] = {}
    events: list[Event] = []
    snaps: dict[str, int] = {}
    comm: list[tuple[Node, Work]] = []

    def flush(d: int, snap_of: str | None = None) -> None:
        if pending.get(d):
            segs.append(pending.pop(d))
            seg_dev.append(d)
            snap = -1
            if snap_of is not None:
                snap = snaps[snap_of] = len(snaps)
            events.append(Event("seg", len(segs) - 1, (d,), snap=snap))

    hosted: list[int] = []  # per priced node: itself plus the free nodes (views, leaves) the host walked before it
    skipped = 0
    routed: set[tuple[int, str, str]] = set()  # (device, activations, routing) of expert matmuls seen
    routes: list[float] = []
    const = constants(g)  # weight-only nodes (a merged weight's concat): folded at load, free per call
    for n in g.nodes:
        if n.op in LEAVES or n.op in VIEWS or n.op == Op.OUTPUT or n.name in const:
            skipped += 1
            continue
        ins = [_made_by(g, i) for i in n.inputs]
        if n.op in (Op.COPY, Op.ALL_REDUCE):
            group = tuple(dix[d] for d in n.devices)
            for d in group:
                flush(d)
            w = work(n, ins, env0)
            comm.append((n, w))
            snap = snaps[n.name] = len(snaps)
            src = -1
            if n.op == Op.COPY:
                p = _producer(g, n.inputs[0])
                src = snaps[p] if p is not None else -1
            events.append(Event("copy" if n.op == Op.COPY else "allreduce", len(comm) - 1, group, src, snap))
            continue
        d = dix[n.device]
        rows.append((n, work(n, ins, env0), work(n, ins, env1)))
        routes.append(0.0)
        if rows[-1][1].experts > 0:
            key = (d, n.inputs[0], n.inputs[3 if n.op == Op.SWIGLU_MOE_MATMUL else 2])
            routes[-1] = float(key not in routed)
            routed.add(key)
        hosted.append(1 + skipped)
        skipped = 0
        pending.setdefault(d, []).append(len(rows) - 1)
        if n.name in feeds:
            flush(d, n.name)
    for d in sorted(pending):
        flush(d)
    order = [i for s in segs for i in s]
    seg_start = np.cumsum([0] + [len(s) for s in segs[:-1]]) if segs else np.zeros(0, int)
    R = [rows[i] for i in order]

    def col(f: str, which: int = 0) -> np.ndarray:
        return np.array([getattr(r[1 + which], f) for r in R], dtype=float)

    def lin(f: str) -> np.ndarray:
        a, b = col(f, 0), col(f, 1)
        return np.stack([a, b - a])

    return Priced(
        phase=str(g.info.get("phase", "pp")), tokens=T, devices=devices,
        names=tuple(r[0].name for r in R), ops=tuple(r[0].op.value for r in R),
        dev=np.array([dix[r[0].device] for r in R], dtype=int),
        kind=np.array([KINDS.index(r[1].kind) for r in R], dtype=int),
        flops=lin("flops"), wbytes=col("wbytes"), kvbytes=lin("kvbytes"), actbytes=lin("actbytes"),
        launches=col("launches"), mnk=np.stack([col("m"), col("n"), col("k")]), kv_cap=col("kv_cap"),
        moe=np.stack([col("experts"), col("used"), col("shared"), np.array([routes[i] for i in order])]),
        host_nodes=np.array([hosted[i] for i in order], dtype=float),
        wdtype=tuple(r[1].wdtype for r in R), seg_start=np.asarray(seg_start, dtype=int),
        seg_dev=np.array(seg_dev, dtype=int),
        comm_kind=tuple(w.kind for _, w in comm),
        comm_numel=np.array([w.comm_numel for _, w in comm], dtype=float),
        comm_elem=np.array([w.comm_elem for _, w in comm], dtype=float),
        comm_launches=np.array([w.launches for _, w in comm], dtype=float),
        comm_tokens=np.array([w.tokens for _, w in comm], dtype=float),
        comm_group=tuple(tuple(dix[d] for d in n.devices) for n, _ in comm),
        events=tuple(events), n_snaps=len(snaps), meta=g.meta, comm_names=tuple(n.name for n, _ in comm),
    )
