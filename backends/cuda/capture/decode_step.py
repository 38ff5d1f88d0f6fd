"""Token-generation steps with fixed shapes, captured in CUDA graphs per device segment.

`DecodeStep(session, bucket)` runs the decode graph (T = 1) over the first `bucket` rows of
every KV cache: new rows are written at a device-side position (`kvpos`, one int64 [1] per
device), attention masks the rows past it on the device, the position advances on the
device at the end of the step, and conv / delta-net state is copied back into the session's
own tensors inside the step. Nothing in a step depends on a host value, so while the cache
grows within the bucket the same captured graphs stay valid: capture once per bucket (per
sweep row), replay for every token.

The decode graph is cut into a schedule of segments: between two boundaries (a `copy` of an
activation, an `all_reduce`) the nodes of each device form one segment (no value crosses
devices inside such a stretch: `verify` guarantees it), captured as one CUDA graph on that
device's stream. Boundaries run eagerly between replays, writing into fixed buffers: a copy
into a preallocated tensor, an all-reduce (NCCL) in place on the partials. Copies of the
token positions are not boundaries: every device has its own position counter.

Without CUDA (or with `capture=False`) the same schedule runs eagerly, which is what tests on
logical CPU devices check.

The step runs the graph as the session's passes made it, every node once: kernel fusions and
in-place state updates are nodes of that graph (passes/fuse.py, in the graphir-cuda pipeline),
so the cost model prices what the step runs. The step swaps only how attention and kv_append
address the bucket, where copies and outputs write, and never adds a node.
"""

from __future__ import annotations

import gc
from typing import Any, Sequence

import torch

from backends.cuda.rules import fastpath
from backends.cuda.runtime.devices import torch_device
from backends.cuda.runtime.interp import ExecContext, ExecError, Replicas, _read
from graphir.graph import Node
from graphir.ops import LEAVES, Op


class DecodeStep:
    def __init__(self, session: Any, bucket: int, *, capture: bool | None = None, token: int = 0) -> None:
        s = self.s = session
        g = self.g = s.executed["tg"]
        rows = min((b.shape[0] for b in s.buffers.values()), default=bucket)
        if not 1 <= bucket <= rows:
            raise ExecError(f"bucket of {bucket} cache rows does not fit the preallocated {rows}")
        if s.n_past >= bucket:
            raise ExecError(f"bucket of {bucket} rows is too small for a cache of {s.n_past} tokens")
        self.bucket = bucket
        devs = s.used_devices()
        self.capture = all(d.startswith("cuda") for d in devs) if capture is None else capture
        with s.streams:  # created on the streams that read them
            self._setup(bucket, devs, token)
        if self.capture:
            self._capture()

    def _setup(self, bucket: int, devs: list[str], token: int) -> None:
        s, g = self.s, self.g
        self.kvpos = {d: torch.full((1,), s.n_past, dtype=torch.int64, device=torch_device(d)) for d in devs}
        self.pos32 = {d: torch.full((1,), s.n_past, dtype=torch.int32, device=torch_device(d)) for d in devs}
        self.start = s.n_past
        self.steps = 0
        self.tokens: dict[str, torch.Tensor] = {}
        feeds: dict[str, torch.Tensor] = {}
        for n in g.nodes:
            dev = n.devices[0] if n.device else s.devices[0]
            if n.op == Op.INPUT and n.attr["role"] == "tokens":
                feeds[n.name] = self.tokens[n.name] = torch.full((1,), token, dtype=torch.int32,
                                                                 device=torch_device(dev))
            elif n.op == Op.INPUT and n.attr["role"] == "positions":
                feeds[n.name] = self.pos32[dev]
            elif n.op == Op.STATE_IN:
                key = str(n.attr["state"])
                feeds[n.name] = s.buffers[key][:bucket - 1] if key in s.buffers else s.state[key]
        self.ctx = ExecContext(g, {"T": 1, "KV": bucket - 1}, feeds, s.weights, s.buffers, s.devices[0],
                               bucket=bucket, kvpos=self.kvpos, choices=s.choices)
        self.kernels = dict(s.kernels)
        # bucket mode lives in the fast rules (which also run on the CPU)
        self.kernels[Op.ATTENTION] = fastpath.attention
        self.kernels[Op.KV_APPEND] = fastpath.kv_append
        self.kernels[Op.OUTPUT] = self._output
        self.kernels[Op.COPY] = self._copy
        # the graph as the passes made it: fusions and in-place state updates are nodes of it
        self.schedule = decode_schedule(g, s.devices[0])
        self.last_use = _last_use(self.schedule)
        self.logits: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    # ---- kernels this runner changes ----------------------------------------------------------
    def _is_position(self, n: Node) -> bool:
        return is_position_copy(self.g, n)

    def _copy(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        if self._is_position(node):
            return self.pos32[node.devices[0]]  # every device counts positions itself
        return self.s.kernels[Op.COPY](node, args, ctx)

    def _output(self, node: Node, args: Sequence[Any], ctx: ExecContext) -> Any:
        key = str(node.attr["key"])
        state = self.s.state.get(key)
        if state is not None:
            if args[0].data_ptr() != state.data_ptr():  # an in_place node wrote it there already
                state.copy_(args[0])  # in place, inside the step (and its graph)
        elif key == "logits":
            self.logits = args[0]
        return args[0]

    # ---- running ----------------------------------------------------------------------------------
    def _run_nodes(self, nodes: Sequence[Node], env: dict[str, Any], advance: Sequence[str],
                   free: bool = True) -> None:
        for node in nodes:
            args = [_read(env[i], node) for i in node.inputs]
            try:
                out = self.kernels[node.op](node, args, self.ctx)
            except Exception as e:
                raise ExecError(f"%{node.name} ({node.op.value}) in a decode step: {type(e).__name__}: {e}") from e
            env[node.name] = out
            if free:
                for i in dict.fromkeys(node.inputs):
                    if self.last_use.get(i) == node.name:
                        env.pop(i, None)
        for d in advance:  # the step's last work on device d: move its position on
            self.kvpos[d].add_(1)
            self.pos32[d].add_(1)

    def _boundary(self, node: Node, env: dict[str, Any], free: bool = True) -> None:
        args = [_read(env[i], node) for i in node.inputs]
        if node.op == Op.COPY:
            buf = self._buffers.get(node.name)
            if buf is None:
                buf = self._buffers[node.name] = torch.empty_like(args[0], device=torch_device(node.devices[0]))
            buf.copy_(args[0], non_blocking=True)
            env[node.name] = buf
        else:  # an all-reduce: its results must stay where the captured consumers read them
            out = self.kernels[node.op](node, args, self.ctx)
            pinned = Replicas() if isinstance(out, Replicas) else None
            for dev, t in (out.items() if isinstance(out, Replicas) else (("", out),)):
                key = f"{node.name}@{dev}"
                kept = self._buffers.setdefault(key, t)
                if kept.data_ptr() != t.data_ptr():
                    kept.copy_(t)  # not reduced in place (a cast, a shared partial): one more copy
                if pinned is None:
                    env[node.name] = kept
                else:
                    pinned[dev] = kept
            if pinned is not None:
                env[node.name] = pinned
        if free:
            for i in dict.fromkeys(node.inputs):
                if self.last_use.get(i) == node.name:
                    env.pop(i, None)

    def _advance_map(self) -> dict[int, list[str]]:
        """Which schedule item advances each device's position: its last segment (else the end)."""
        last: dict[str, int] = {}
        for k, item in enumerate(self.schedule):
            if item[0] == "seg" and _works(item[2]):
                last[item[1]] = k
        out: dict[int, list[str]] = {}
        for d in self.kvpos:
            out.setdefault(last.get(d, len(self.schedule)), []).append(d)
        return out

    def _eager(self) -> None:
        env: dict[str, Any] = {}
        adv = self._advance_map()
        for k, item in enumerate(self.schedule):
            if item[0] == "seg":
                self._run_nodes(item[2], env, adv.get(k, ()))
            else:
                self._boundary(item[1], env)
        for d in adv.get(len(self.schedule), ()):
            self.kvpos[d].add_(1)
            self.pos32[d].add_(1)

    def close(self) -> None:
        """Drop the captured graphs and buffers now (outside any capture), not whenever the
        garbage collector gets to them: destroying a graph while another is being captured
        invalidates that capture."""
        self._plan = []
        self._env = {}
        self._buffers = {}
        self.kernels = {}
        self.logits = None

    def _capture(self) -> None:
        s = self.s
        gc.collect()  # as torch.cuda.graph does: no collection (of old graphs) mid-capture
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture_all()
        finally:
            if was_enabled:
                gc.enable()

    def _capture_all(self) -> None:
        s = self.s
        snap = s.snapshot()
        with s.streams:
            self._eager()  # warm-up: compiles kernels, creates handles and cached constants
        s.streams.synchronize_all()
        self._buffers.clear()  # boundary results get their fixed homes during the capture pass
        env: dict[str, Any] = {}
        adv = self._advance_map()
        pools = {d: torch.cuda.graph_pool_handle() for d in s.streams.streams}
        plan: list[tuple[str, Any]] = []
        with s.streams:
            for k, item in enumerate(self.schedule):
                # every value stays referenced: replays read and write the same memory
                if item[0] == "seg" and not _works(item[2]):
                    self._run_nodes(item[2], env, (), free=False)  # views and leaves: nothing to replay
                elif item[0] == "seg":
                    dev = torch_device(item[1])
                    pieces = _pieces(item[2], PIECE_NODES)
                    for j, nodes in enumerate(pieces):
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.device(dev):
                            graph.capture_begin(pool=pools[dev])
                            try:
                                self._run_nodes(nodes, env, adv.get(k, ()) if j == len(pieces) - 1 else (),
                                                free=False)
                            finally:
                                graph.capture_end()
                        plan.append(("graph", (dev, graph)))
                else:
                    self._boundary(item[1], env, free=False)
                    plan.append(("bnd", item[1]))
        self._env = env  # captured outputs and boundary buffers stay alive at fixed addresses
        self._plan = _runs(plan)
        self._tail = adv.get(len(self.schedule), [])
        s.streams.synchronize_all()
        s.restore(snap)
        with s.streams:
            self._reset_positions()

    def _reset_positions(self) -> None:
        for d in self.kvpos:
            self.kvpos[d].fill_(self.start)
            self.pos32[d].fill_(self.start)
        self.steps = 0

    def step(self, token: int | None = None) -> None:
        """One token at the next position (`token`: the id to feed; default: the last one)."""
        s = self.s
        if self.start + self.steps >= self.bucket:
            raise ExecError(f"bucket of {self.bucket} rows is full after {self.steps} decode steps")
        with s.streams:
            if token is not None:
                for t in self.tokens.values():
                    t.fill_(int(token))
            if not self.capture:
                self._eager()
            else:
                for kind, what in self._plan:
                    if kind == "graphs":  # consecutive graphs of one device: one device switch
                        with torch.cuda.device(what[0]):
                            for graph in what[1]:
                                graph.replay()
                    else:
                        self._boundary(what, self._env, free=False)
                for d in self._tail:
                    self.kvpos[d].add_(1)
                    self.pos32[d].add_(1)
        self.steps += 1
        s.n_past = self.start + self.steps


# Nodes per captured graph. Launching a graph costs host time that grows with its kernels
# (~170 us for the ~400 of a Qwen3-Next decode step on an H200, measured), and the GPU starts
# only once the launch returns; in pieces, the GPU runs the first while the host launches
# the next, so a step waits for one piece's launch instead of the whole graph's.
PIECE_NODES = 64


def _pieces(nodes: Sequence[Node], size: int) -> list[list[Node]]:
    """Consecutive runs of about `size` nodes (views and leaves ride along for free); the first
    runs are shorter (size/8, /4, /2): the GPU starts once the first piece is launched, and a
    decode step that waits for each token starts every step from an idle GPU."""
    out: list[list[Node]] = [[]]
    work = 0
    limits = [max(1, size // 8), max(1, size // 4), max(1, size // 2)]
    for n in nodes:
        if work >= (limits[len(out) - 1] if len(out) <= len(limits) else size):
            out.append([])
            work = 0
        out[-1].append(n)
        work += _launches(n)
    if len(out) > 1 and not _works(out[-1]):  # a tail of views alone would capture an empty graph
        out[-2].extend(out.pop())
    return out


def _runs(plan: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """[("graph", (dev, g)) | ("bnd", node)] -> [("graphs", (dev, [g, ...])) | ("bnd", node)]:
    consecutive graphs of one device replay under one device switch (less host time before
    the GPU gets its next piece)."""
    out: list[tuple[str, Any]] = []
    for kind, what in plan:
        if kind == "graph" and out and out[-1][0] == "graphs" and out[-1][1][0] == what[0]:
            out[-1][1][1].append(what[1])
        elif kind == "graph":
            out.append(("graphs", (what[0], [what[1]])))
        else:
            out.append((kind, what))
    return out


def is_position_copy(g: Any, n: Node) -> bool:
    """A copy of the token positions: every device counts positions itself (not a boundary)."""
    src = g[n.inputs[0]] if n.op == Op.COPY else None
    return src is not None and src.op == Op.INPUT and src.attr.get("role") == "positions"


def decode_schedule(g: Any, default: str) -> list[tuple]:
    """[("seg", device, nodes) | ("bnd", node)]: what a decode step runs, in order (every node
    of `g` once): per stretch between boundaries, one segment per device in order of first
    appearance; leaves join the segment of their device."""
    return _schedule(g, lambda n: is_position_copy(g, n), default)


def _schedule(g: Any, is_position: Any, default: str) -> list[tuple]:
    out: list[tuple] = []
    stretch: dict[str, list[Node]] = {}

    def flush() -> None:
        for d, ns in stretch.items():
            if ns:
                out.append(("seg", d, ns))
        stretch.clear()

    for n in g.nodes:
        boundary = (n.op == Op.COPY and not is_position(n)) or n.op == Op.ALL_REDUCE
        if boundary:
            flush()
            out.append(("bnd", n))
            continue
        d = n.devices[0] if n.device else default
        stretch.setdefault(d, []).append(n)
    flush()
    return out


def _works(nodes: Sequence[Node]) -> bool:
    """Whether a segment launches anything (leaves, slices and result views alone: an empty graph)."""
    return any(_launches(n) for n in nodes)


def _launches(n: Node) -> bool:
    """Whether a node may launch a kernel here: not a leaf, a slice or a result view (a
    reshape may copy, an output copies a state back)."""
    return n.op not in LEAVES and n.op not in (Op.SLICE, Op.RESULT)


def _last_use(schedule: Sequence[tuple]) -> dict[str, str]:
    """The node (in schedule order) that reads each value last."""
    out: dict[str, str] = {}
    for item in schedule:
        for n in (item[2] if item[0] == "seg" else (item[1],)):
            for i in n.inputs:
                out[i] = n.name
    return out
