"""Memory plan: totals against the graph's own sums, KV scaling, refusal with the numbers."""

from __future__ import annotations

import pytest

from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.ops import Op
from graphir.quant import scheme
from passes import MemoryPlanError, check_fit, parse_mem, place_graph, place_layer, plan_memory
from passes.devices import PlacementError

GIB = 1 << 30


@pytest.fixture(scope="module")
def qnext():
    cfg = load_preset("qwen3-next-80b-a3b")
    return cfg, build(cfg, BuildOptions(quant=scheme("IQ4_XS"), kv_type="q8_0"))


def test_unplaced_plan_matches_the_graph_sums(qnext) -> None:
    cfg, g = qnext
    plan = plan_memory(g, ctx=65536)
    (m,) = plan.devices
    assert m.weights == sum(n.spec.nbytes_at({}) for n in g.by_op(Op.WEIGHT))
    # 12 attention layers x K and V x 2 KV heads x 256 dims, q8_0: 34 bytes per 32 values
    assert m.kv == 12 * 2 * 65536 * 2 * 256 // 32 * 34
    assert m.state == 36 * (128 * 32 * 128 * 4 + 3 * 8192 * 4)  # delta-net state f32 + conv state f32
    assert 0 < m.compute < 2 * GIB
    assert plan_memory(g, ctx=131072).devices[0].kv == 2 * m.kv


def test_placements_share_the_weights(qnext) -> None:
    cfg, g = qnext
    whole = plan_memory(g).devices[0].weights
    layer = plan_memory(place_layer(g, cfg, 2))
    assert sum(d.weights for d in layer.devices) == whole  # untied head: nothing replicated
    graph = plan_memory(place_graph(g, cfg, 2))
    total = sum(d.weights for d in graph.devices)
    assert whole < total < 1.02 * whole  # norms and routers replicated on both
    assert all(0.45 * whole < d.weights < 0.55 * whole for d in graph.devices)


def test_refusal_lists_every_device(qnext) -> None:
    cfg, g = qnext
    plan = plan_memory(place_layer(g, cfg, 2), ctx=4096)
    check_fit(plan, parse_mem("2x3090"))  # ~20 GiB each fits 24 GB
    with pytest.raises(MemoryPlanError) as e:
        check_fit(plan, parse_mem("16GiB,16GiB"))
    msg = str(e.value)
    assert "\n" not in msg and "cuda:0 " in msg and "cuda:1 " in msg and "of 16.00 GiB" in msg


def test_parse_mem() -> None:
    assert parse_mem("24GiB,24GiB") == (24 * GIB, 24 * GIB)
    assert parse_mem("80GB") == (80 * 10**9,)
    assert parse_mem("12") == (12 * GIB,)
    assert parse_mem("2x3090") == (24 * 10**9, 24 * 10**9)
    with pytest.raises(PlacementError, match="sizes like"):
        parse_mem("lots")
    with pytest.raises(PlacementError, match="2 size"):
        parse_mem("1GiB,2GiB", 3)
