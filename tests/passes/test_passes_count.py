"""The node-count estimate against the builder on every preset, and the llama.cpp heuristic."""

from __future__ import annotations

import pytest

from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset, preset_names
from graphir.ops import Op
from graphir.quant import scheme
from passes import PassContext, count_nodes, estimate_nodes, heuristic_budget, run_pipeline
from passes.count import n_tensors

CASES = [  # (split, devices, ts, recurrent, merges)
    (None, 1, None, "single", ()),
    ("layer", 2, None, "single", ("merge_qkv", "merge_up_gate")),
    ("graph", 2, None, "single", ("merge_qkv", "merge_up_gate")),
    ("graph", 3, (2.0, 1.0, 1.0), "split", ()),
    (None, 1, None, "single", ("merge_siblings", "merge_qkv", "merge_up_gate")),
    ("graph", 2, None, "split", ("merge_siblings", "merge_qkv", "merge_up_gate")),
    ("graph", 2, None, "single", ("merge_up_gate", "merge_siblings")),
]


@pytest.mark.parametrize("name", preset_names())
def test_estimate_bounds_the_built_graph_for_every_preset(name: str) -> None:
    cfg = load_preset(name)
    for phase, quant in (("pp", "Q4_K_M"), ("tg", "IQ4_XS")):
        opts = BuildOptions(phase=phase, quant=scheme(quant), logits="last" if phase == "pp" else "all")  # type: ignore[arg-type]
        g = build(cfg, opts)
        assert n_tensors(cfg, range(cfg.n_layer)) == len(g.by_op(Op.WEIGHT))
        for split, n, ts, rec, merges in CASES:
            if phase == "tg" and split == "layer":
                continue  # keep the test short: layer split does not depend on the phase
            devs = tuple(f"cuda:{k}" for k in range(n))
            pipe = ((f"place_{split}",) if split else ()) + merges
            out = run_pipeline(g, pipe, PassContext(cfg=cfg, devices=devs, ts=ts, recurrent=rec),
                               verify_each=False).graph
            est = estimate_nodes(cfg, opts, merges=merges, split=split, devices=devs, ts=ts, recurrent=rec)
            actual = count_nodes(out)
            assert actual.total <= est.budget <= 1.05 * actual.total, (name, phase, split, n)
            assert est.exact == actual.total, (name, phase, split, n)


def test_per_device_counts_collectives_on_each_member() -> None:
    cfg = load_preset("qwen3-8b").with_layers(2)
    g = run_pipeline(build(cfg), ("place_graph",), PassContext(cfg=cfg, devices=("cuda:0", "cuda:1"))).graph
    c = count_nodes(g)
    per = dict(c.per_device)
    assert sum(per.values()) == c.total + len(g.by_op(Op.ALL_REDUCE))  # each reduce counted twice
    est = estimate_nodes(cfg, BuildOptions(), split="graph", devices=("cuda:0", "cuda:1"))
    assert dict(est.per_device) == per


def test_estimate_does_not_grow_with_the_batch_but_the_heuristic_does() -> None:
    cfg = load_preset("qwen3-next-80b-a3b")
    small = estimate_nodes(cfg, BuildOptions(phase="pp"), ubatch=512)
    big = estimate_nodes(cfg, BuildOptions(phase="pp"), ubatch=4096)
    assert small.exact == big.exact
    assert big.heuristic == max(40 * 4096, 32 * small.n_tensors) > small.heuristic
    graph2 = estimate_nodes(cfg, BuildOptions(), split="graph", devices=2)
    assert graph2.heuristic == 32 * graph2.n_tensors * 2  # n_tensors x devices under graph split
    assert heuristic_budget(load_preset("llama-3-8b"), 512, 291) == 65536


def test_estimate_knows_pinned_layer_groups() -> None:
    cfg = load_preset("qwen3-next-80b-a3b")
    devs = ("cuda:0", "cuda:1", "cuda:2")
    groups = {i: devs[:1] for i in cfg.recurrent_layers}
    from passes import place_graph

    g = place_graph(build(cfg), cfg, devs, layer_groups=groups, recurrent="split")
    est = estimate_nodes(cfg, BuildOptions(), split="graph", devices=devs, layer_groups=groups, recurrent="split")
    assert est.exact == count_nodes(g).total
