"""Load-time constants: nodes computed from weights alone are evaluated once.

A merged QKV weight (a `concat` of weight leaves), a weight copied to another device, a
slice or reshape of a weight: their values never change between calls. `fold_weights`
evaluates them when the session loads, stores them among the weights and returns the graph
to execute, where each such node is a weight leaf and the leaves only it read are gone (so
their memory is freed). The graph the cost model prices keeps the nodes; they cost nothing
per call there either.
"""

from __future__ import annotations

from typing import Mapping

import torch

from backends.cuda.runtime.interp import ExecContext, Kernel
from graphir.graph import Graph, Node, constants
from graphir.ops import Op


def fold_weights(g: Graph, weights: dict[str, torch.Tensor], kernels: Mapping[Op, Kernel],
                 default_device: str = "cpu") -> Graph:
    """Evaluate weight-only nodes into `weights` (in place) and return the graph to execute."""
    const = constants(g)
    folded = [n for n in g.nodes if n.name in const and n.op != Op.WEIGHT]
    if not folded:
        return g
    ctx = ExecContext(g, {}, {}, weights, {}, default_device)
    for n in folded:
        if n.name not in weights:  # the prefill and decode graphs share their constants
            weights[n.name] = _evaluate(kernels, n, [weights[i] for i in n.inputs], ctx)
    names = {n.name for n in folded}
    nodes = [Node(n.name, Op.WEIGHT, (), n.spec, (), n.device) if n.name in names else n for n in g.nodes]
    read = {i for n in nodes for i in n.inputs}
    # a folded node's own inputs are no longer read; leaves nobody reads now drop out
    nodes = [n for n in nodes if n.op != Op.WEIGHT or n.name in read]
    return Graph(tuple(nodes), g.meta)


ROW_ALIGN = 16  # rows of a merged weight on a GPU are padded to this (see _evaluate)


def _evaluate(kernels: Mapping[Op, Kernel], n: Node, args: list[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    return align_rows(n, kernels[n.op](n, args, ctx).contiguous())


def align_rows(n: Node, out: torch.Tensor) -> torch.Tensor:
    """A merged weight with a row count that is not a multiple of ROW_ALIGN (router 512 +
    shared expert 2x512 + its 1-row gate = 1537) gives a product whose rows are not 16-byte
    aligned, and cuBLAS falls back to a kernel several times slower (measured on an H200:
    165 us against ~30 us for a 2048-token batch). On a GPU such a weight is stored with zero
    rows appended; the value is the first rows, and `aligned_base` names the padded tensor,
    which the matmul rule (fastpath.matmul) multiplies by before slicing the result back."""
    rows = out.shape[0] if out.dim() == 2 else 0
    if n.op != Op.CONCAT or not out.is_cuda or rows % ROW_ALIGN == 0:
        return out
    pad = torch.zeros((rows + ROW_ALIGN - rows % ROW_ALIGN, out.shape[1]), dtype=out.dtype, device=out.device)
    pad[:rows].copy_(out)
    view = pad[:rows]
    view.aligned_base = pad  # type: ignore[attr-defined]
    return view
