"""Reference placement (used until passes/ provides place_layer / place_graph)."""

from __future__ import annotations

import collections

import pytest

from backends.costmodel.placement import PlaceOptions, layer_devices, partition, place_reference
from graphir.graph import verify
from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.ops import Op
from graphir.quant import scheme

TWO = ("cuda:0", "cuda:1")


def _opts(phase: str, quant: str = "IQ4_XS", kv: str = "q8_0") -> BuildOptions:
    return BuildOptions(phase=phase, quant=scheme(quant), kv_type=kv, logits="last")


@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_qwen3_next_graph_split_matches_ik(phase: str) -> None:
    cfg = load_preset("qwen3-next-80b-a3b")
    g = place_reference(cfg, _opts(phase), PlaceOptions("graph", TWO))
    verify(g)
    ops = collections.Counter(n.op for n in g.nodes)
    assert ops[Op.ALL_REDUCE] == 60 and ops[Op.COPY] == 36  # REFERENCE §1, PR 1292
    # MoE: 512-wide experts, 256-element IQ4_XS blocks -> 2 slices
    w = g["blk.0.ffn_down_exps.weight#1"]
    assert w.spec.shape == (512, 2048, 256) and w.attr["slice_dim"] == 2 and w.attr["start"] == 256
    # attention: one KV head per device, cache split the same way
    assert g["blk.3.cache_k#1"].spec.shape[1] == 1 and g["blk.3.kqv#0"].spec.shape[1] == 8


def test_recurrent_split_replaces_copies_by_reduces() -> None:
    cfg = load_preset("qwen3-next-80b-a3b").with_layers(8)
    g = place_reference(cfg, _opts("tg"), PlaceOptions("graph", TWO, recurrent="split"))
    verify(g)
    ops = collections.Counter(n.op for n in g.nodes)
    # two reduces per layer; the only copy left brings the embedding to the second GPU
    assert ops[Op.ALL_REDUCE] == 16 and ops[Op.COPY] == 1


def test_layer_split_is_the_model_graph_plus_devices() -> None:
    cfg = load_preset("qwen3-14b").with_layers(6)
    g = place_reference(cfg, _opts("pp", "Q4_K_M", "f16"), PlaceOptions("layer", TWO))
    verify(g)
    plain = build(cfg, _opts("pp", "Q4_K_M", "f16"))
    assert {n.name for n in plain.nodes} <= {n.name for n in g.nodes}
    assert [n.op for n in g.nodes].count(Op.COPY) == 1  # the residual at the one boundary
    assert g["blk.0.attn_q"].device == "cuda:0" and g["blk.5.attn_q"].device == "cuda:1"
    assert g["result_output"].device == "cuda:1"


def test_dense_graph_split_two_reduces_per_layer() -> None:
    cfg = load_preset("qwen3-14b").with_layers(3)
    g = place_reference(cfg, _opts("tg", "Q4_0", "f16"), PlaceOptions("graph", TWO))
    verify(g)
    assert [n.op for n in g.nodes].count(Op.ALL_REDUCE) == 6
    assert g["blk.0.ffn_up.weight#0"].spec.shape == (8704, 5120)


def test_one_device_layer_equals_graph() -> None:
    cfg = load_preset("qwen3-next-80b-a3b").with_layers(4)
    a = place_reference(cfg, _opts("tg"), PlaceOptions("layer", ("cuda:0",)))
    b = place_reference(cfg, _opts("tg"), PlaceOptions("graph", ("cuda:0",)))
    assert a.nodes == b.nodes


def test_partition_and_layer_assignment() -> None:
    assert partition(2, [1, 1]) == [(0, 1), (1, 2)]
    assert partition(2, [1, 1, 1, 1]) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert partition(10, [3, 1]) == [(0, 8), (8, 10)]
    assert layer_devices(48, [0.5, 0.5], ["a", "b"]).count("a") == 24


def test_max_gpu_limits_the_group() -> None:
    cfg = load_preset("qwen3-14b").with_layers(4)
    devs = ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    g = place_reference(cfg, _opts("tg", "Q4_0", "f16"), PlaceOptions("graph", devs, max_gpu=2))
    verify(g)
    groups = {n.device for n in g.nodes if n.op == Op.ALL_REDUCE}
    assert groups == {"cuda:0,cuda:1", "cuda:2,cuda:3"}
