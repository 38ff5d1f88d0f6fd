"""The cost model's placement adapter: `place()` is the placement passes, nothing of its own."""

from __future__ import annotations

import collections

import pytest

from planner.placement import PlaceOptions, place
from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.ops import Op
from graphir.quant import scheme
from passes import PlacementError, place_graph, place_layer

TWO = ("cuda:0", "cuda:1")


def _opts(phase: str, quant: str = "IQ4_XS", kv: str = "q8_0") -> BuildOptions:
    return BuildOptions(phase=phase, quant=scheme(quant), kv_type=kv, logits="last")


@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_layer_and_graph_are_the_passes(phase: str) -> None:
    cfg = load_preset("qwen3-next-80b-a3b").with_layers(8)
    opts = _opts(phase)
    g = build(cfg, opts)
    assert place(cfg, opts, PlaceOptions("layer", TWO)).nodes == place_layer(g, cfg, TWO).nodes
    assert place(cfg, opts, PlaceOptions("graph", TWO, recurrent="split")).nodes == \
        place_graph(g, cfg, TWO, recurrent="split").nodes
    assert place(cfg, opts, PlaceOptions("graph", TWO, ts=(3.0, 1.0))).nodes == \
        place_graph(g, cfg, TWO, ts=(3.0, 1.0)).nodes


def test_qwen3_next_graph_split_matches_ik() -> None:
    cfg = load_preset("qwen3-next-80b-a3b")
    g = place(cfg, _opts("tg"), PlaceOptions("graph", TWO))
    ops = collections.Counter(n.op for n in g.nodes)
    assert ops[Op.ALL_REDUCE] == 60  # REFERENCE §1, PR 1292: 12 x 2 + 36 x 1
    w = g["blk.0.ffn_down_exps.weight#1"]  # 512-wide experts, 256-element blocks -> 2 slices
    assert w.spec.shape == (512, 2048, 256) and w.attr["slice_dim"] == 2 and w.attr["start"] == 256


def test_auto_routes_to_place_auto() -> None:
    cfg = load_preset("qwen3-14b").with_layers(2)
    from planner.workload import Workload

    g = place(cfg, _opts("tg", "Q4_0", "f16"),
              PlaceOptions("auto", TWO, workload=Workload(512, 32, 4096)))
    assert g.placed and g.info["split"] == "auto"


def test_unknown_split_and_no_devices() -> None:
    cfg = load_preset("qwen3-14b").with_layers(2)
    with pytest.raises(PlacementError, match="unknown split"):
        place(cfg, _opts("tg"), PlaceOptions("row", TWO))  # type: ignore[arg-type]
    with pytest.raises(PlacementError, match="no devices"):
        place(cfg, _opts("tg"), PlaceOptions("layer", ()))
