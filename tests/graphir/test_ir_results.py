"""Nodes with several results: specs inferred from the ops they fuse, read through `result`
views only, in-place state never read after it is overwritten, and every text form (text,
JSON, networkx, dot) carrying all results."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cuda.rules.pipeline import ENGINE_PASSES
from graphir.builder import Builder
from graphir.graph import Graph, GraphError, Node, verify
from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.ops import DEFS, Op, ShapeError, infer_results
from graphir.quant import scheme
from graphir.serialize import from_json, to_dot, to_json, to_networkx
from graphir.spec import spec
from graphir.text import from_text, to_text
from passes.manager import PassContext, run_pipeline


def _add_norm(D: int = 8) -> Builder:
    b = Builder()
    b.leaf(Op.INPUT, "a", spec("f32", "T", D), role="tokens")
    b.leaf(Op.INPUT, "b", spec("f32", "T", D), role="positions")
    b.leaf(Op.WEIGHT, "w", spec("f32", D))
    b.emit(Op.ADD_RMS_NORM, "f", "a", "b", "w", eps=1e-6)
    return b


def test_fused_node_has_the_specs_of_the_values_it_replaces() -> None:
    b = _add_norm()
    b.emit(Op.RESULT, "sum", "f", index=0)
    b.emit(Op.RESULT, "normed", "f", index=1)
    b.emit(Op.OUTPUT, "out", "normed", key="logits")
    g = b.graph()
    verify(g)
    assert g["f"].results == (spec("f32", "T", 8), spec("f32", "T", 8)) and g["f"].spec == g["sum"].spec
    assert DEFS[Op.RESULT].launches == 0 and DEFS[Op.ADD_RMS_NORM].launches == 1


def test_a_node_with_several_results_is_read_through_result_views_only() -> None:
    b = _add_norm()
    b.add(Node("bad", Op.OUTPUT, ("f",), spec("f32", "T", 8), (("key", "logits"),)))
    with pytest.raises(GraphError, match=r"%bad reads %f, which has several results"):
        verify(b.graph())
    with pytest.raises(GraphError, match=r"index=2 out of range for 2 results"):
        _add_norm().emit(Op.RESULT, "r", "f", index=2)
    c = Builder()
    c.leaf(Op.INPUT, "x", spec("f32", 4), role="tokens")
    with pytest.raises(GraphError, match="result reads a node with several results"):
        c.emit(Op.RESULT, "r", "x", index=0)


def test_verify_recomputes_every_result() -> None:
    g = _add_norm().graph()
    f = g["f"]
    wrong = g.replace_nodes(n.with_(outs=(spec("f32", "T", 9),)) if n.name == "f" else n for n in g.nodes)
    with pytest.raises(GraphError, match=r"%f \(add_rms_norm\): spec f32\[T,8\], f32\[T,9\] but its inputs give"):
        verify(wrong)
    assert f.with_(outs=()).results == (f.spec,)


def _conv_step(in_place: bool, read_after: bool) -> Graph:
    b = Builder()
    b.leaf(Op.STATE_IN, "s", spec("f32", 3, 16), state="s")
    b.leaf(Op.INPUT, "x", spec("f32", 1, 16), role="tokens")
    b.leaf(Op.WEIGHT, "w", spec("f32", 16, 4))
    b.emit(Op.SSM_CONV_STEP, "c", "s", "x", "w", act="silu", in_place=in_place or None)
    b.emit(Op.RESULT, "y", "c", index=0)
    b.emit(Op.RESULT, "nxt", "c", index=1)
    b.emit(Op.OUTPUT, "o", "nxt", key="s")
    if read_after:
        b.emit(Op.ADD, "late", "s", "s")
    return b.graph()


def test_in_place_state_is_not_read_after_it_is_overwritten() -> None:
    verify(_conv_step(True, False))
    verify(_conv_step(False, True))  # a fresh next state: the old one may still be read
    with pytest.raises(GraphError, match=r"%late reads %s after %c wrote over it in place"):
        verify(_conv_step(True, True))
    b = Builder()
    b.leaf(Op.INPUT, "s", spec("f32", 3, 16), role="tokens")
    b.leaf(Op.INPUT, "x", spec("f32", 1, 16), role="positions")
    b.leaf(Op.WEIGHT, "w", spec("f32", 16, 4))
    b.emit(Op.SSM_CONV_STEP, "c", "s", "x", "w", in_place=True)
    with pytest.raises(GraphError, match="not a state_in"):
        verify(b.graph())


def test_fused_rules_refuse_what_the_fused_kernels_cannot_take() -> None:
    f32, i32 = "f32", "i32"
    with pytest.raises(ShapeError, match="two rows of one spec"):
        infer_results(Op.ADD_RMS_NORM, [(spec(f32, 1, 8),), (spec(f32, 1, 4),), (spec(f32, 8),)], {"eps": 1e-6})
    with pytest.raises(ShapeError, match="shared gate"):
        infer_results(Op.MOE_TOPK_WEIGHTS, [(spec(f32, 1, 8),)], {"k": 2, "shared": 1})
    got = infer_results(Op.MOE_TOPK_WEIGHTS, [(spec(f32, 1, 8),), (spec(f32, 1, 1),)], {"k": 2, "shared": 1})
    assert got == (spec(i32, 1, 3), spec(f32, 1, 3))
    with pytest.raises(ShapeError, match="K-1 rows"):
        infer_results(Op.SSM_CONV_STEP, [(spec(f32, 2, 8),), (spec(f32, 1, 8),), (spec(f32, 8, 4),)], {})
    with pytest.raises(ShapeError, match="f32 state"):
        infer_results(Op.DELTA_NET, [(spec(f32, 1, 2, 4),)] * 2 + [(spec(f32, 1, 2, 4),)] + [(spec(f32, 1, 2),)] * 2
                      + [(spec("bf16", 4, 2, 4),)], {"in_place": True})


@pytest.mark.parametrize("preset,phase", [("qwen3-next-80b-a3b", "tg"), ("qwen3-30b-a3b", "pp"),
                                          ("qwen3-30b-a3b", "tg")])
def test_engine_graph_round_trips_through_every_form(preset: str, phase: str) -> None:
    cfg = load_preset(preset)
    g = build(cfg, BuildOptions(phase=phase, quant=scheme("bf16"), kv_type="bf16"), range(0, 4))  # type: ignore[arg-type]
    g = run_pipeline(g, ENGINE_PASSES, PassContext(cfg=cfg)).graph
    multi = [n for n in g.nodes if n.outs]
    assert multi
    assert from_text(to_text(g)) == g and from_json(to_json(g)) == g
    G = to_networkx(g)
    n = multi[0]
    assert G.nodes[n.name]["spec"] == ", ".join(map(str, n.results))
    assert f"{n.op.value} {n.spec}, {n.outs[0]}" in to_dot(g)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 64), t=st.sampled_from(["T", 1, 5]), k=st.integers(0, 1))
def test_result_views_have_exact_specs(d: int, t: object, k: int) -> None:
    """Whatever the shape, each view's spec is its result's, and the text form keeps both."""
    b = Builder()
    b.leaf(Op.INPUT, "a", spec("bf16", t, d), role="tokens")
    b.leaf(Op.INPUT, "b", spec("bf16", t, d), role="positions")
    b.leaf(Op.WEIGHT, "w", spec("bf16", d))
    b.emit(Op.ADD_RMS_NORM, "f", "a", "b", "w", eps=1e-5, offset=1.0)
    b.emit(Op.RESULT, "r", "f", index=k)
    b.emit(Op.OUTPUT, "o", "r", key="logits")
    g = b.graph()
    verify(g)
    assert g["r"].spec == g["f"].results[k] == spec("bf16", t, d)
    assert from_text(to_text(g)) == g
