"""Placement: random configs x random placements verify, match the estimate, and compute the
same logits as the unplaced graph; plus the REFERENCE §1 facts on real presets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from graphir.graph import GraphError, verify
from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.ops import Op
from graphir.quant import scheme
from passes import (PassError, PlacementError, count_nodes, estimate_nodes, insert_transfers, place_graph,
                    place_layer, verify_placed)
from helpers.passes_common import (Placement, attention_capacity_error, configs, placed, placements, session_class,
                                tiny_opts)

Session = session_class()
QUANTS = ("f32", "bf16", "q8_0", "q4_k", "iq4_xs")


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), p=placements(), phase=st.sampled_from(["pp", "tg"]), quant=st.sampled_from(QUANTS))
def test_random_placements_verify_and_match_the_estimate(cfg, p: Placement, phase: str, quant: str) -> None:
    opts = BuildOptions(phase=phase, quant=scheme(quant), kv_type="q8_0")  # type: ignore[arg-type]
    try:
        g = placed(cfg, p, opts)
    except PassError as e:
        assume(not attention_capacity_error(e))
        raise
    if p.split:
        verify_placed(g)
        assert g.info["devices"] == ",".join(p.devices)
    else:
        verify(g)
    est = estimate_nodes(cfg, opts, **p.estimate_kwargs())
    actual = count_nodes(g)
    assert actual.total <= est.budget <= 1.05 * actual.total
    assert est.exact == actual.total
    if p.split:
        assert {d: k for d, k in est.per_device if k} == {d: k for d, k in actual.per_device if k}


@pytest.mark.skipif(Session is None, reason="backends.cuda has no Session yet (the executor is being written)")
@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), p=placements(splits=("layer", "graph")))
def test_random_placements_compute_the_unplaced_logits(cfg, p: Placement) -> None:
    ids, more = [3, 1, 4, 1, 5], [9, 2]
    ref = Session(cfg, devices="cpu", ctx=16)
    want_pp, want_tg = ref.prefill(ids), ref.decode(more)
    try:
        s = Session(cfg, devices="cpu", ctx=16, transform=lambda g: placed_graph(g, cfg, p))
    except PassError as e:
        assume(not attention_capacity_error(e))
        raise
    # f32 end to end; partial sums add in another order than one matmul, hence 1e-5 not 0
    torch.testing.assert_close(s.prefill(ids), want_pp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.decode(more), want_tg, rtol=1e-5, atol=1e-5)


def placed_graph(g, cfg, p: Placement):  # type: ignore[no-untyped-def]
    from passes import run_pipeline

    return run_pipeline(g, p.pipeline(), p.context(cfg)).graph


# ---- REFERENCE §1 facts on the real Qwen3-Next shapes ------------------------------------------
@pytest.fixture(scope="module")
def qnext():
    cfg = load_preset("qwen3-next-80b-a3b")
    return cfg, build(cfg, BuildOptions(quant=scheme("IQ4_XS"), kv_type="q8_0"))


def test_qwen3_next_graph_split_on_two_devices_as_ik_llama(qnext) -> None:
    cfg, g = qnext
    pg = place_graph(g, cfg, ("cuda:0", "cuda:1"))
    verify_placed(pg)
    # 12 attention layers x 2 reduces + 36 delta-net layers x 1 (their split MoE) = 60;
    # each delta-net layer's output is copied to the other device once (+1 copy of positions)
    assert len(pg.by_op(Op.ALL_REDUCE)) == 60
    copies = [n for n in pg.by_op(Op.COPY) if n.inputs[0] != "positions"]
    assert len(copies) == 36 and all(n.inputs[0].endswith("attn_residual") for n in copies)
    # 2 KV heads: one per device; the KV cache split by head along dim 1
    k = [n for n in pg.by_op(Op.STATE_IN) if n.attr.get("src") == "blk.3.cache_k"]
    assert [(n.device, n.attr["start"], n.attr["stop"]) for n in k] == [("cuda:0", 0, 1), ("cuda:1", 1, 2)]
    assert {n.attr["key"] for n in pg.by_op(Op.OUTPUT)} >= {"blk.3.cache_k#0", "blk.3.cache_k#1"}


def test_two_kv_heads_and_256_blocks_cap_the_split(qnext) -> None:
    cfg, g = qnext
    pg = place_graph(g, cfg, ("cuda:0", "cuda:1", "cuda:2", "cuda:3"), recurrent="split")
    verify_placed(pg)
    layer3 = [n for n in pg.nodes if n.layer == 3]
    # attention on at most 2 devices; a 512-wide expert in 256-element blocks gives 2 slices
    assert len({n.device for n in layer3 if n.name.startswith("blk.3.attn_q#")}) == 2
    assert len([n for n in layer3 if n.name.startswith("blk.3.ffn_down_exps.weight#")]) == 2
    # delta-net split by key heads over all 4: 16 key heads -> 4 each, value heads and state alike
    st_ = [n for n in pg.by_op(Op.STATE_IN) if n.attr.get("src") == "blk.0.ssm_state"]
    assert [(n.attr["start"], n.attr["stop"]) for n in st_] == [(0, 8), (8, 16), (16, 24), (24, 32)]


def test_a_device_may_receive_zero_granules() -> None:
    cfg = load_preset("qwen3-8b").with_layers(4)
    g = build(cfg, tiny_opts())
    pg = place_graph(g, cfg, ("cpu:0", "cpu:1"), ts=(1000, 1))  # 1/1001 of 8 KV heads rounds to 0
    verify_placed(pg)
    attn1 = [n for n in pg.nodes if n.device == "cpu:1" and "attn_q" in n.name]
    ffn1 = [n for n in pg.nodes if n.device == "cpu:1" and "ffn_up" in n.name]
    assert not attn1 and ffn1  # the FFN (12288 wide, 768 granules) still gives it a few


def test_layer_split_ratios_and_boundaries() -> None:
    cfg = load_preset("llama-3-8b").with_layers(8)
    pl = place_layer(build(cfg, tiny_opts()), cfg, ("cuda:0", "cuda:1"), ts=(3, 1))
    verify_placed(pl)
    dev = {i: pl[f"blk.{i}.l_out"].device for i in range(8)}
    assert [dev[i] for i in range(8)] == ["cuda:0"] * 6 + ["cuda:1"] * 2
    assert pl["result_output"].device == "cuda:1" and pl["inp_embd"].device == "cuda:0"
    assert [n.inputs[0] for n in pl.by_op(Op.COPY)] == ["blk.5.l_out", "positions"]


def test_max_gpu_rotates_groups_over_layers() -> None:
    cfg = load_preset("qwen3-8b").with_layers(3)
    pg = place_graph(build(cfg, tiny_opts()), cfg, ("cpu:0", "cpu:1", "cpu:2"), max_gpu=2)
    groups = [pg[f"blk.{i}.l_out"].device for i in range(3)]
    assert groups == ["cpu:0,cpu:1", "cpu:0,cpu:2", "cpu:1,cpu:2"]


def test_insert_transfers_completes_a_partial_assignment() -> None:
    cfg = load_preset("llama-3-8b").with_layers(2)
    g = build(cfg, tiny_opts())
    where = {"blk.1.attn_q": "cpu:1", "blk.1.l_out": "cpu:1"}
    pg = insert_transfers(g, where, default="cpu:0")
    verify_placed(pg)
    assert pg["blk.1.attn_q.weight"].device == "cpu:1"  # a leaf follows its first reader
    assert pg["blk.1.k_heads"].device == "cpu:0"  # others inherit from their first input
    assert pg["blk.1.q_rope"].device == "cpu:1"  # downstream of attn_q follows it
    assert [n.inputs[0] for n in pg.by_op(Op.COPY)] == [
        "blk.1.attn_norm", "positions", "blk.1.cache_k.next", "blk.1.cache_v.next", "blk.1.attn_output",
        "blk.1.attn_residual", "blk.1.ffn_down"]
    with pytest.raises(PlacementError, match="unknown node"):
        insert_transfers(g, {"nope": "cpu:0"})


def test_tied_embeddings_get_a_replica_leaf_not_a_copy() -> None:
    cfg = load_preset("qwen3-0.6b").with_layers(2)
    pl = place_layer(build(cfg, tiny_opts()), cfg, ("cpu:0", "cpu:1"))
    rep = pl["token_embd.weight#1"]
    assert rep.op == Op.WEIGHT and rep.attr["src"] == "token_embd.weight" and rep.device == "cpu:1"
    assert all(n.inputs[0] != "token_embd.weight" for n in pl.by_op(Op.COPY))


def test_verify_placed_catches_broken_contracts() -> None:
    cfg = load_preset("qwen3-8b").with_layers(1)
    pg = place_graph(build(cfg, tiny_opts()), cfg, ("cpu:0", "cpu:1"))
    shifted = {**pg["blk.0.cache_k#1"].attr, "start": 5, "stop": 9}  # leaves a gap after head 4
    bad = pg.replace_nodes([n.with_(attrs=tuple(shifted.items())) if n.name == "blk.0.cache_k#1" else n
                            for n in pg.nodes])
    with pytest.raises(GraphError, match="gap or overlap"):
        verify_placed(bad)
    moved = pg.replace_nodes([n.with_(device="cpu:0") if n.name == "blk.0.attn_q#1" else n for n in pg.nodes])
    with pytest.raises(GraphError, match="insert a copy"):
        verify_placed(moved)
    with pytest.raises(PlacementError, match="already placed"):
        place_graph(pg, cfg, ("cpu:0", "cpu:1"))


def test_layer_split_by_memory_weighs_layer_sizes() -> None:
    cfg = load_preset("qwen3-next-80b-a3b").with_layers(8)  # 6 delta-net + 2 attention layers
    g = build(cfg, BuildOptions(kv_type="f16"))
    by_count = place_layer(g, cfg, ("cuda:0", "cuda:1"), ts=(1, 2))
    by_bytes = place_layer(g, cfg, ("cuda:0", "cuda:1"), ts=(1, 2), by_memory=True, ctx=1 << 20)
    verify_placed(by_bytes)
    first = [i for i in range(8) if by_count[f"blk.{i}.l_out"].device == "cuda:0"]
    heavy = [i for i in range(8) if by_bytes[f"blk.{i}.l_out"].device == "cuda:0"]
    assert first == [0, 1, 2]  # a third of the layers
    # a third of the bytes: layers 0-2 (3.1 GiB each) end before 1/3 of 28.6 GiB, so layer 3
    # (5.1 GiB with its million-token KV cache) starts there too
    assert heavy == [0, 1, 2, 3]
