"""Load a session's weights and fold load-time constants, one tensor at a time.

`fold.fold_weights` folds after every weight is loaded, so a merged tensor (the concat of
gate and up experts) and its parts are alive together: twice the expert bytes, which a
full-size model cannot afford. `load_folded` walks the constants in program order instead:
it loads a weight leaf, evaluates each weight-only node (concat, copy, slice, reshape) as
soon as its inputs exist, and drops every tensor that no later node needs. The peak is the
final weights plus one layer's parts.

A piece (`src`, `slice_dim/start/stop`) is cut from the full tensor, which is read once and
kept only while later pieces still need it; a piece is cloned, so it never pins the full
tensor's memory. Sources with `get_on(info, device, dtype)` (DeviceRandomWeights) draw the
full tensor on the device of its first piece.
"""

from __future__ import annotations

from typing import Container, Mapping

import torch

from backends.cuda.quant import kept
from backends.cuda.quant.repack import Packed
from backends.cuda.runtime.devices import torch_device
from backends.cuda.weights.fold import align_rows
from backends.cuda.runtime.interp import ExecContext, Kernel
from backends.cuda.weights.sources import WeightError, WeightInfo, WeightSource, assemble, source_names
from graphir.graph import Graph, Node, constants, is_constant
from graphir.ops import Op


def _constants(graphs: Mapping[str, Graph]) -> tuple[list[Node], set[str], dict[str, int]]:
    """(constant nodes in first-appearance order, constants read by run-time nodes, readers among constants)."""
    order: dict[str, Node] = {}
    live: set[str] = set()
    for g in graphs.values():
        const: set[str] = set()
        for n in g.nodes:
            if is_constant(n, const):
                const.add(n.name)
                order.setdefault(n.name, n)
            else:
                live.update(i for i in n.inputs if i in const)
    readers: dict[str, int] = {}
    for n in order.values():
        for i in dict.fromkeys(n.inputs):
            readers[i] = readers.get(i, 0) + 1
    return list(order.values()), live, readers


def _load_order(nodes: list[Node], leaves: list[Node]) -> list[Node]:
    """Constants in an order that keeps every source tensor's uses together: when a leaf is
    loaded, the other leaves cut from the same source tensor (the other phase's placement of
    it, another device's slice) load with it, and every constant whose inputs are then all
    present is computed at once. In first-appearance order, a prefill layout that slices the
    experts and a decode layout that keeps them whole would hold every full expert tensor
    from the first slice to the decode graph's leaf, i.e. the whole model at once."""
    by_source: dict[str, list[Node]] = {}
    for n in leaves:
        for p in source_names(n):
            by_source.setdefault(p, []).append(n)
    missing = {n.name: len(set(n.inputs)) for n in nodes if n.op != Op.WEIGHT}
    waiting: dict[str, list[Node]] = {}
    for n in nodes:
        for i in set(n.inputs):
            waiting.setdefault(i, []).append(n)
    out: list[Node] = []
    done: set[str] = set()

    def emit(n: Node) -> None:
        stack = [n]
        while stack:
            m = stack.pop()
            if m.name in done:
                continue
            done.add(m.name)
            out.append(m)
            for d in waiting.get(m.name, ()):
                missing[d.name] -= 1
                if missing[d.name] == 0:
                    stack.append(d)

    for n in nodes:
        if n.op == Op.WEIGHT and n.name not in done:
            for p in source_names(n):
                for sib in by_source[p]:
                    emit(sib)
        elif n.op != Op.WEIGHT and n.name not in done and missing[n.name] == 0:
            emit(n)
    out += [n for n in nodes if n.name not in done]  # (none: every input is a constant)
    return out


class _Pieces:
    """Full tensors by source name, each kept until its last piece is cut."""

    def __init__(self, source: WeightSource, reference: Mapping[str, WeightInfo], leaves: list[Node],
                 keep: bool = False) -> None:
        self.source, self.reference, self.keep = source, reference, keep
        self.uses: dict[str, int] = {}
        for n in leaves:
            for p in source_names(n):
                self.uses[p] = self.uses.get(p, 0) + 1
        self.full: dict[str, torch.Tensor | Packed] = {}

    def _get(self, name: str, node: Node, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.full:
            info = self.reference.get(name)
            if info is None:
                raise WeightError(f"graph weight %{node.name} refers to {name}, which this model does not have")
            get_on = getattr(self.source, "get_on", None)
            t = self.source.get_kept(info) if self.keep else None  # type: ignore[attr-defined]
            if t is None:
                t = get_on(info, device, dtype) if get_on is not None else self.source.get(info)
            if tuple(t.shape) != info.shape:
                raise WeightError(f"{name}: {self.source.label} gives shape {list(t.shape)}, "
                                  f"the config needs {list(info.shape)}")
            self.full[name] = t
        return self.full[name]

    @staticmethod
    def _kept(node: Node, ts: list[torch.Tensor | Packed], device: torch.device) -> Packed | None:
        """The piece as blocks when its sources are kept and its cut keeps them (quant/kept.py)."""
        if not all(kept.is_kept(t) for t in ts):
            return None
        p = kept.assemble(node, ts)  # type: ignore[arg-type]
        if p is not None and p.shape != tuple(int(d) for d in node.spec.shape):
            raise WeightError(f"graph weight %{node.name} wants shape {list(node.spec.shape)}, its source gives "
                              f"{list(p.shape)}")
        return None if p is None else kept.to_device(p, device)

    def piece(self, node: Node, device: torch.device, dtype: torch.dtype) -> torch.Tensor | Packed:
        parts = source_names(node)
        ts = [self._get(p, node, device, dtype) for p in parts]
        t = self._kept(node, ts, device)
        if t is None:
            ts = kept.dequantised(ts, dtype)  # (mixed types, or a cut inside a block)
            t = assemble(node, [x.to(device=device, dtype=dtype) for x in ts] if len(ts) > 1 else ts)
            t = t.to(device=device, dtype=dtype).contiguous()
            if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                t = t.clone()  # a slice must not keep the whole tensor alive
        for p in parts:
            self.uses[p] -= 1
            if self.uses[p] == 0:
                self.full.pop(p, None)
        return t


def load_folded(graphs: Mapping[str, Graph], reference: Mapping[str, WeightInfo], source: WeightSource,
                dtype: torch.dtype, default_device: str, kernels: Mapping[Op, Kernel], keep_quant: bool = False
                ) -> tuple[dict[str, torch.Tensor], dict[str, Graph]]:
    """(weights the executed graphs read, by node name; the graphs with constants folded to leaves).
    `keep_quant`: matmul weights the source holds in blocks stay blocks (quant/kept.py)."""
    nodes, live, readers = _constants(graphs)
    leaves = [n for n in nodes if n.op == Op.WEIGHT]
    nodes = _load_order(nodes, leaves)
    pieces = _Pieces(source, reference, leaves, keep_quant)
    weights: dict[str, torch.Tensor] = {}
    any_graph = next(iter(graphs.values()))
    ctx = ExecContext(any_graph, {}, {}, weights, {}, default_device)
    for n in nodes:
        dev = torch_device(n.devices[0] if n.device else default_device)
        if n.op == Op.WEIGHT:
            weights[n.name] = pieces.piece(n, dev, dtype)
        else:
            args = [weights[i] for i in n.inputs]
            out = kept.fold(n, args, ctx) if keep_quant else None
            if out is None:
                out = align_rows(n, kernels[n.op](n, kept.dequantised(args, dtype), ctx).contiguous())
            weights[n.name] = out
            for i in dict.fromkeys(n.inputs):
                readers[i] -= 1
                if readers[i] == 0 and i not in live:
                    del weights[i]  # only constants read it, and they are all computed now
    executed = {k: _as_leaves(g, weights) for k, g in graphs.items()}
    if keep_quant:
        _dequantise_non_matmul(executed, weights, dtype)
    return weights, executed


def _dequantise_non_matmul(graphs: Mapping[str, Graph], weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Only a matmul's weight operand takes blocks: a kept weight any other node reads (an
    embedding table's get_rows, a fused op) is dequantised, once, to the compute type."""
    for g in graphs.values():
        for n in g.nodes:
            for k, i in enumerate(n.inputs):
                if kept.is_kept(weights.get(i)) and not (n.op == Op.MATMUL and k == 1):
                    weights[i] = kept.dense(weights[i], dtype)  # type: ignore[arg-type]


def executed_graph(g: Graph) -> Graph:
    """The graph `load_folded` makes of `g`, from its structure alone: constants a computing
    node reads are weight leaves, the other constants gone (what the executor walks)."""
    const = constants(g)
    read = {i for n in g.nodes if n.name not in const for i in n.inputs}
    return _as_leaves(g, read)


def _as_leaves(g: Graph, weights: Container[str]) -> Graph:
    """Folded constants become weight leaves; constants nobody reads any more drop out."""
    const: set[str] = set()
    out: list[Node] = []
    for n in g.nodes:
        if is_constant(n, const):
            const.add(n.name)
            if n.name in weights:
                out.append(n if n.op == Op.WEIGHT else Node(n.name, Op.WEIGHT, (), n.spec, (), n.device))
            continue
        out.append(n)
    read = {i for n in out for i in n.inputs}
    return Graph(tuple(n for n in out if n.op != Op.WEIGHT or n.name in read), g.meta)
