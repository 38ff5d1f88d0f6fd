"""The auto search space: every `Choice` is a valid placed graph; layer and graph split are two
of its points (identical graphs); any point computes the unplaced graph's logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.ops import Op
from graphir.quant import scheme
from passes import place_graph, place_layer, verify_placed
from passes.regions import head_splittable
from planner.auto_space import (KINDS, Choice, graph_choice, home_counts, layer_choice, model_kinds, place_choice,
                               state_layout)
from helpers.passes_common import configs, session_class

Session = session_class()
TWO = ("cuda:0", "cuda:1")


def _g(model: str, layers: int, phase: str = "tg", quant: str = "IQ4_XS"):  # type: ignore[no-untyped-def]
    cfg = load_preset(model).with_layers(layers)
    return cfg, build(cfg, BuildOptions(phase=phase, quant=scheme(quant), kv_type="q8_0", logits="last"))


@pytest.mark.parametrize("model,layers", [("qwen3-next-80b-a3b", 8), ("qwen3-14b", 4), ("qwen3-30b-a3b", 4)])
@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_layer_choice_is_place_layer(model: str, layers: int, phase: str) -> None:
    cfg, g = _g(model, layers, phase)
    home = home_counts(cfg, 2, range(layers), (1.0, 1.0))
    assert place_choice(g, cfg, TWO, layer_choice(home, 2)).nodes == place_layer(g, cfg, TWO).nodes


@pytest.mark.parametrize("model", ["qwen3-14b", "qwen3-30b-a3b"])
def test_graph_choice_is_place_graph(model: str) -> None:
    cfg, g = _g(model, 4, quant="Q4_0")
    kinds = model_kinds(cfg, range(4))
    home = home_counts(cfg, 2, range(4), (1.0, 1.0))
    assert place_choice(g, cfg, TWO, graph_choice(kinds, home, 2)).nodes == place_graph(g, cfg, TWO).nodes


def test_qwen3_next_graph_choice_counts_as_ik() -> None:
    """Delta-net layers whole (on their home device rather than rotated): same collectives."""
    cfg, g = _g("qwen3-next-80b-a3b", 48)
    home = home_counts(cfg, 2, range(48), (1.0, 1.0))
    pg = place_choice(g, cfg, TWO, graph_choice(("attn", "delta", "moe"), home, 2))
    assert len(pg.by_op(Op.ALL_REDUCE)) == 60


def test_hybrid_attention_split_keeps_the_rest_whole() -> None:
    cfg, g = _g("qwen3-next-80b-a3b", 8)
    pg = place_choice(g, cfg, TWO, Choice(("attn",), (4, 4), (1.0, 1.0)))
    verify_placed(pg)
    # attention layers 3 and 7 split by KV head, one all-reduce each; delta-net and MoE whole
    assert [n.name for n in pg.by_op(Op.ALL_REDUCE)] == ["blk.3.attn_residual", "blk.7.attn_residual"]
    assert pg["blk.0.ffn_moe_out"].device == "cuda:0" and pg["blk.5.ffn_moe_out"].device == "cuda:1"
    lay = state_layout(pg)
    assert ("blk.3.cache_k", "cuda:1", 1, 1, 2) in lay and ("blk.0.ssm_state", "cuda:0", -1, -1, -1) in lay


def test_split_head_rows() -> None:
    cfg, g = _g("qwen3-14b", 2, quant="Q4_0")
    assert head_splittable(g)
    pg = place_choice(g, cfg, TWO, Choice(("attn", "ffn"), (1, 1), (1.0, 1.0), head_split=True))
    verify_placed(pg)
    w1 = pg["output.weight#1"]
    assert w1.attr["slice_dim"] == 0 and w1.attr["stop"] == cfg.vocab_size and pg["result_output"].op == Op.CONCAT


def test_tied_head_is_not_splittable() -> None:
    cfg, g = _g("qwen3-0.6b", 2, quant="Q4_0")
    assert cfg.tie_word_embeddings and not head_splittable(g)


@st.composite
def choices(draw: st.DrawFn, kinds: tuple[str, ...], n_layer: int) -> tuple[Choice, tuple[str, ...]]:
    n = draw(st.integers(1, 3))
    split = tuple(k for k in kinds if draw(st.booleans()))
    cuts = sorted(draw(st.lists(st.integers(0, n_layer), min_size=n - 1, max_size=n - 1)))
    home = tuple(b - a for a, b in zip([0] + cuts, cuts + [n_layer]))
    ratios = tuple(draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in range(n))
    ch = Choice(split, home, ratios, group=draw(st.sampled_from([0, 2])) if n == 3 else 0,
                reduce_dtype=draw(st.sampled_from([None, "f16", "f32"])), head_split=draw(st.booleans()))
    return ch, tuple(f"cpu:{k}" for k in range(n))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cfg=configs(), phase=st.sampled_from(["pp", "tg"]))
def test_random_choices_are_valid_placed_graphs(data, cfg, phase: str) -> None:  # type: ignore[no-untyped-def]
    g = build(cfg, BuildOptions(phase=phase, quant=scheme("q8_0"), kv_type="q8_0"))  # type: ignore[arg-type]
    ch, devs = data.draw(choices(model_kinds(cfg, range(cfg.n_layer)), cfg.n_layer))
    assume(not ch.head_split or head_splittable(g))
    pg = place_choice(g, cfg, devs, ch)
    verify_placed(pg)
    assert set(ch.split) <= set(KINDS) and pg.info["split"] == "auto"


@pytest.mark.skipif(Session is None, reason="backends.cuda has no Session")
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cfg=configs())
def test_random_choices_compute_the_unplaced_logits(data, cfg) -> None:  # type: ignore[no-untyped-def]
    ch, devs = data.draw(choices(model_kinds(cfg, range(cfg.n_layer)), cfg.n_layer))
    ch = ch.with_(reduce_dtype=None)  # f32 end to end: only the summation order differs
    probe = build(cfg, BuildOptions(phase="tg"))
    assume(not ch.head_split or head_splittable(probe))
    ids, more = [3, 1, 4, 1, 5], [9, 2]
    ref = Session(cfg, devices="cpu", ctx=16)
    want_pp, want_tg = ref.prefill(ids), ref.decode(more)
    s = Session(cfg, devices="cpu", ctx=16, transform=lambda g: place_choice(g, cfg, devs, ch))
    torch.testing.assert_close(s.prefill(ids), want_pp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.decode(more), want_tg, rtol=1e-5, atol=1e-5)


def test_resident_memory_of_one_placement_is_its_memory_plan() -> None:
    from passes import plan_memory
    from planner.auto_memory import ResidentMemory

    cfg, g = _g("qwen3-next-80b-a3b", 8, "pp")
    a = place_choice(g, cfg, TWO, Choice((), (4, 4), (1.0, 1.0)))
    b = place_choice(g, cfg, TWO, Choice(("attn",), (4, 4), (1.0, 1.0)))
    mem = ResidentMemory(TWO, (24 * 10**9, 24 * 10**9), 32768, 512)
    ia, ib = mem.add([a]), mem.add([b])
    for got, want in zip(mem.plan((ia,)).devices, plan_memory(a, 32768, 512).devices):
        assert (got.weights, got.kv, got.state, got.compute) == (want.weights, want.kv, want.state, want.compute)
    # both: the attention pieces of the split layout (slices, norm replicas) come on top
    both, alone = mem.plan((ia, ib)), mem.plan((ia,))
    extra_w = sum(d.weights for d in both.devices) - sum(d.weights for d in alone.devices)
    attn = sum(n.spec.nbytes_at({}) for n in g.nodes
               if n.op == Op.WEIGHT and n.name.startswith(("blk.3.attn", "blk.7.attn")))
    assert extra_w == attn
    assert sum(d.kv for d in both.devices) == 2 * sum(d.kv for d in alone.devices)  # whole + split caches
