"""fold_shared_expert: the shared expert as extra routed-expert slots gives the unfolded
graph's logits (f32, up to rounding), alone, before the merges, and per device after a split."""

from __future__ import annotations

import pytest
import torch

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import rel_err, torch_threads
from graphir.graph import Graph, verify
from graphir.models import BuildOptions, build, from_hf_dict
from graphir.ops import Op
from passes import PassContext, fold_shared_expert, merge_siblings, run_pipeline
from passes.shared_expert import GONE
from helpers.placed_models import CONFIGS, DEVS, PROMPT

QNEXT = CONFIGS["qwen3_next"]  # E=4, k=2, N=8, S=8: one shared slot
QNEXT_M2 = dict(QNEXT, shared_expert_intermediate_size=16)  # S = 2N: two slots
# N and S of two granules each (16 columns), so a graph split gives each device N_j=16, S_j=32
QNEXT_SPLIT = dict(QNEXT, moe_intermediate_size=32, shared_expert_intermediate_size=64)
MERGES = ("merge_siblings", "merge_qkv", "merge_up_gate")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def tg_graph(hf: dict) -> Graph:
    return build(from_hf_dict(hf), BuildOptions(phase="tg"))


def run_against_unfolded(hf: dict, pipeline: tuple[str, ...]) -> Session:
    """Prefill of 5 tokens then 3 decode steps, with `pipeline` against no passes (f32)."""
    cfg = from_hf_dict(hf)
    ref, gen = greedy(Session(cfg, "random", "cpu", 16, seed=7), PROMPT[:5], 3)
    pctx = PassContext(cfg=cfg, devices=DEVS)
    s = Session(cfg, "random", "cpu:0", 16, seed=7, transform=lambda g: run_pipeline(g, pipeline, pctx).graph)
    got = torch.cat([s.prefill(PROMPT[:5]), s.decode(gen)])
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4
    return s


@pytest.mark.parametrize("hf,m", [(QNEXT, 1), (QNEXT_M2, 2)], ids=["m1", "m2"])
def test_fold_rewrites_each_layer(hf: dict, m: int) -> None:
    cfg = from_hf_dict(hf)
    g = tg_graph(hf)
    f = fold_shared_expert(g)
    verify(f)
    E, k, N, H = cfg.n_expert, cfg.n_expert_used, cfg.moe_intermediate_size, cfg.hidden_size
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        assert not [r for r in GONE if p + r in f]
        topk, wts = f[p + "ffn_moe_topk"], f[p + "ffn_moe_weights"]
        assert topk.attr == {"k": k, "shared": m} and topk.spec.shape == (1, k + m)
        assert wts.inputs == (p + "ffn_gate_inp", p + "ffn_moe_topk", p + "ffn_gate_inp_shexp")
        assert wts.attr["shared"] == m and wts.spec.shape == (1, k + m)
        for role, shape in (("ffn_gate_exps", (E + m, N, H)), ("ffn_up_exps", (E + m, N, H)),
                            ("ffn_down_exps", (E + m, H, N))):
            w = f[f[p + role].inputs[1]]
            assert w.name == p + role + ".weight.sh" and w.op == Op.CONCAT and w.spec.shape == shape
        # the layer's FFN result is now moe_sum's, read by the residual add
        assert p + "ffn_moe_out" in f[p + "l_out"].inputs
    assert fold_shared_expert(f) is f  # nothing left to fold
    # deterministic: the same graph twice
    assert fold_shared_expert(tg_graph(hf)) == f


def test_merge_siblings_takes_router_and_shared_gate() -> None:
    f = merge_siblings(fold_shared_expert(tg_graph(QNEXT)))
    verify(f)
    merged = f["blk.0.ffn_router_shgate"]
    assert merged.op == Op.MATMUL and f[merged.inputs[1]].spec.shape == (4 + 1, 32)
    assert f["blk.0.ffn_gate_inp_shexp"].op == Op.SLICE and "blk.0.ffn_router_shexp" not in f
    # the unfolded graph keeps its four-member merge
    u = merge_siblings(tg_graph(QNEXT))
    assert "blk.0.ffn_router_shexp" in u and "blk.0.ffn_router_shgate" not in u


@pytest.mark.parametrize("hf", [QNEXT, QNEXT_M2], ids=["m1", "m2"])
@pytest.mark.parametrize("pipeline", [("fold_shared_expert",), ("fold_shared_expert", *MERGES)],
                         ids=["fold", "fold+merges"])
def test_folded_logits_match_unfolded(hf: dict, pipeline: tuple[str, ...]) -> None:
    s = run_against_unfolded(hf, pipeline)
    tg = s.executed["tg"]
    assert not [n for n in tg.nodes if n.name.endswith("ffn_moe_shexp")]
    # the new expert weights are folded at load into weight leaves
    new = [n for n in tg.nodes if ".weight.sh" in n.name or n.name.endswith("ffn_gate_up_exps.weight")]
    assert new and all(n.op == Op.WEIGHT for n in new)


def test_model_without_shared_expert_is_unchanged() -> None:
    g = tg_graph(CONFIGS["qwen3_moe"])
    assert fold_shared_expert(g) is g
    dense = tg_graph(CONFIGS["qwen3"])
    assert fold_shared_expert(dense) is dense


def test_pattern_mismatch_leaves_layer_alone() -> None:
    """Already merged (the shared expert's matmuls are slices now): no fold."""
    g = merge_siblings(tg_graph(QNEXT))
    assert fold_shared_expert(g) is g
    # S not a multiple of N: no fold
    odd = tg_graph(dict(QNEXT, shared_expert_intermediate_size=12))
    assert fold_shared_expert(odd) is odd


def test_layer_split_then_fold() -> None:
    s = run_against_unfolded(QNEXT, ("fold_shared_expert", "place_layer", "insert_transfers", *MERGES))
    assert s.graphs["tg"].placed and s.graphs["tg"]["blk.0.ffn_moe_topk"].attr["shared"] == 1


@pytest.mark.parametrize("hf,m", [(QNEXT_SPLIT, 2), (QNEXT, 1)], ids=["per-device", "one-device-regions"])
def test_graph_split_folds_per_device(hf: dict, m: int) -> None:
    """After place_graph each device folds its own columns: S_j / N_j slots on device j."""
    s = run_against_unfolded(hf, ("place_graph", "insert_transfers", "fold_shared_expert", *MERGES))
    g = s.graphs["tg"]
    topks = [n for n in g.by_op(Op.MOE_TOPK) if n.layer == 0]
    assert topks and all(n.attr.get("shared") == m for n in topks)
    assert not [n for n in g.nodes if n.name.split("#")[0].endswith(GONE)]
    if hf is QNEXT_SPLIT:
        assert {n.device for n in topks} == set(DEVS)  # one fold per device
        assert g["blk.0.ffn_down_exps.weight.sh#1"].spec.shape == (4 + 2, 32, 16)


def test_place_graph_needs_the_fold_after_it() -> None:
    """A folded layer's expert weights mix the experts' and the shared expert's cuts: place_graph
    refuses them (the CLIs place first, then run --passes, so the fold comes after it)."""
    from passes import PlacementError, place_graph

    with pytest.raises(PlacementError, match="ffn_gate_shexp.weight.exps"):
        place_graph(fold_shared_expert(tg_graph(QNEXT_SPLIT)), from_hf_dict(QNEXT_SPLIT), DEVS)


def test_shape_rules_of_the_shared_slots() -> None:
    from graphir.ops import ShapeError, infer
    from graphir.spec import TensorSpec

    logits, gate = TensorSpec(("T", 8), "f32"), TensorSpec(("T", 1), "bf16")
    ids = infer(Op.MOE_TOPK, [logits], {"k": 3, "shared": 2})
    assert ids == TensorSpec(("T", 5), "i32")
    assert infer(Op.MOE_WEIGHTS, [logits, ids, gate], {"norm": True, "shared": 2}) == TensorSpec(("T", 5), "f32")
    for ins, attrs in (([logits, ids], {"norm": True, "shared": 2}),  # shared without the gate
                       ([logits, ids, gate], {"norm": True}),  # a gate without shared
                       ([logits, ids, TensorSpec(("T", 2), "f32")], {"norm": True, "shared": 2})):
        with pytest.raises(ShapeError):
            infer(Op.MOE_WEIGHTS, ins, attrs)
    with pytest.raises(ShapeError):
        infer(Op.MOE_TOPK, [logits], {"k": 3, "shared": 0})
