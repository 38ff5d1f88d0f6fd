"""contiguous_heads on synthetic graphs: equal to the unrewritten graph for any head layout
(hypothesis), and the rewrite it promises."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cuda.weights.fold import fold_weights
from backends.cuda.runtime.interp import ExecContext, run_graph
from backends.cuda.reference.kernels import KERNELS
from graphir.builder import Builder
from graphir.graph import Graph, Node, verify
from graphir.ops import Op
from graphir.spec import TensorSpec
from passes.heads import _segments, contiguous_heads


def _projection(heads: int, widths: list[int], order: list[int], joined: list[int]) -> tuple:
    """x [3,K] @ W [heads*sum(widths), K] -> per-head pieces (cut by widths) taken apart as the
    models do; the pieces in `joined` are concatenated (as the delta-net's q, k, v are)."""
    K, C = 8, sum(widths)
    b = Builder()
    b.leaf(Op.INPUT, "x", TensorSpec((3, K), "f32"), role="test")
    b.leaf(Op.WEIGHT, "w", TensorSpec((heads * C, K), "f32"))
    y = b.emit(Op.MATMUL, "y", "x", "w")
    hd = b.emit(Op.RESHAPE, "y_heads", y, shape=(3, heads, C))
    starts = [sum(widths[:i]) for i in range(len(widths))]
    flat = {}
    for i in order:
        p = b.emit(Op.SLICE, f"p{i}", hd, dim=2, start=starts[i], stop=starts[i] + widths[i])
        flat[i] = b.emit(Op.RESHAPE, f"p{i}_flat", p, shape=(3, heads * widths[i]))
    outs = [b.emit(Op.CONCAT, "joined", *[flat[i] for i in joined], dim=1)] if len(joined) > 1 else []
    outs += [flat[i] for i in order if i not in joined or len(joined) == 1]
    for o in outs:
        b.emit(Op.OUTPUT, f"{o}.out", b.emit(Op.SILU, f"{o}.act", o), key=o)
    return b.graph(), outs


def _run(g, x: torch.Tensor, w: torch.Tensor) -> dict:
    weights = {"w": w}
    g = fold_weights(g, weights, KERNELS)
    return run_graph(g, ExecContext(g, {}, {"x": x}, weights, {}), KERNELS)


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 5), widths=st.lists(st.integers(1, 4), min_size=2, max_size=4), data=st.data())
def test_contiguous_heads_is_exact(heads: int, widths: list[int], data: st.DataObject) -> None:
    order = data.draw(st.permutations(range(len(widths))))
    joined = sorted(data.draw(st.sets(st.sampled_from(range(len(widths))), max_size=len(widths))))
    g, outs = _projection(heads, widths, list(order), joined)
    h = contiguous_heads(g)
    verify(h)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    w = torch.randn(heads * sum(widths), 8, generator=torch.Generator().manual_seed(1))
    want, got = _run(g, x, w), _run(h, x, w)
    assert want.keys() == got.keys()
    for k in want:  # the same dot products; a BLAS may block edge columns differently (last bits)
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    if heads > 1:  # interleaved pieces: every piece and the concat became slices of one product
        assert not h.by_op(Op.CONCAT) or all(n.name.startswith("w.") for n in h.by_op(Op.CONCAT))


def test_contiguous_heads_leaves_a_fully_read_product_alone() -> None:
    g, _ = _projection(4, [2, 3], [0, 1], [])
    assert contiguous_heads(g) is not g  # pieces only: rewritten
    nodes = list(g.nodes)
    extra = Node("y.out", Op.OUTPUT, ("y",), g["y"].spec, (("key", "y"),))
    assert contiguous_heads(Graph(tuple(nodes + [extra]), g.meta)).nodes == tuple(nodes + [extra])


def test_segments_describe_head_strided_runs() -> None:
    perm = np.concatenate([np.arange(16) * 768 + j for j in range(128)]).reshape(128, 16).T.reshape(-1)
    assert _segments(perm) == [(0, 768, 128, 16)]
    assert _segments(np.array([5, 6, 7, 1, 2])) == [(5, 3, 3, 1), (1, 2, 2, 1)]
