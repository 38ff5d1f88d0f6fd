"""`place_auto` against layer and graph split: never more than 1% slower at any row, faster
somewhere (the issue's acceptance on 2x3090), on random small models and systems too."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.predict import predict
from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.quant import scheme
from passes import verify_placed
from planner import Workload, WorkloadError, explain, place_auto
from helpers.passes_common import configs

TWO = ("cuda:0", "cuda:1")


def _ratios(pred) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    out = {}
    for m in ("pp", "tg"):
        s = {k: np.array([r.speed(m) for r in pred.modes[k].rows]) for k in ("layer", "graph", "auto")}
        out[m] = s["auto"] / np.maximum(s["layer"], s["graph"])
    return out


@pytest.mark.parametrize("model,quant,kv", [("qwen3-next-80b-a3b", "IQ4_XS", "q8_0"), ("qwen3-14b", "Q4_0", "f16"),
                                            ("qwen3-14b", "Q4_0", "q8_0")])
def test_auto_beats_both_modes_on_2x3090(model: str, quant: str, kv: str) -> None:
    pred = predict(model, "2x3090", "ik_llama.cpp", quant, kv, ("layer", "graph", "auto"), workload=Workload())
    r = _ratios(pred)
    assert min(r["pp"].min(), r["tg"].min()) >= 0.99, (r["pp"].min(), r["tg"].min())
    assert max(r["pp"].max(), r["tg"].max()) > 1.01
    plan = pred.plans["auto"]
    assert not plan.notes and max(plan.memory_GB) <= 24


def test_qwen3_next_plan_is_the_physical_one() -> None:
    """Layer split at short context; attention split over both GPUs (KV heads one per GPU)
    once the KV reads dominate, delta-net and MoE staying whole; MoE never in two layouts."""
    pred = predict("qwen3-next-80b-a3b", "2x3090", "ik_llama.cpp", "IQ4_XS", "q8_0", ("auto",))
    plan = pred.plans["auto"]
    assert plan.segments[0].pp.split == () and plan.segments[-1].tg.split == ("attn",)
    assert all("moe" not in s.pp.split and "moe" not in s.tg.split for s in plan.segments)


def test_workload_weights_steer_the_plan() -> None:
    cfg = load_preset("qwen3-next-80b-a3b")
    g = build(cfg, BuildOptions(phase="tg", quant=scheme("IQ4_XS"), kv_type="q8_0", logits="last"))
    short = place_auto(g, cfg, TWO, Workload(depths=(0, 2048, 4096)), max_segments=1)
    long = place_auto(g, cfg, TWO, Workload(depths=(65536, 81920)), max_segments=1)
    # short context: one GPU after another; long: the KV reads are split (attention at least:
    # whether the delta-net heads follow depends on what a copy costs on the rig)
    assert short.plan.segments[0].tg.split == () and "attn" in long.plan.segments[0].tg.split
    assert len(short.plan.segments) == 1 and short.graph.info["phase"] == "tg"
    verify_placed(long.graph)


def test_plan_places_either_phase_at_any_depth() -> None:
    cfg = load_preset("qwen3-14b").with_layers(4)
    gs = {ph: build(cfg, BuildOptions(phase=ph, quant=scheme("Q4_0"), logits="last")) for ph in ("pp", "tg")}
    res = place_auto(gs["pp"], cfg, TWO, Workload(512, 32, 8192), graphs=gs)
    plan = res.plan
    assert res.graph.nodes == plan.place(gs["pp"]).nodes
    tg = plan.placer(depth=4096)(gs["tg"])
    verify_placed(tg)
    assert tg.info["phase"] == "tg" and plan.choice("tg", 4096) == plan.segment(4096).tg
    assert "candidates" in explain(plan) and plan.evaluated == len(plan.candidates)


def test_graphir_cuda_on_2xh200_bf16() -> None:
    cfg = load_preset("qwen3-next-80b-a3b").with_layers(8)
    g = build(cfg, BuildOptions(phase="pp", quant=scheme("bf16"), logits="last"))
    res = place_auto(g, cfg, TWO, Workload(2048, 128, 65536), "2xH200", "graphir-cuda")
    verify_placed(res.graph)
    assert res.plan.worst >= 0.99 and res.plan.engine == "graphir-cuda"


def test_nothing_fits_is_said() -> None:
    cfg = load_preset("qwen3-14b").with_layers(8)
    g = build(cfg, BuildOptions(phase="tg", quant=scheme("bf16"), logits="last"))
    plan = place_auto(g, cfg, TWO, Workload(512, 32, 4096), "2x3090").plan
    assert not plan.notes
    big = place_auto(g, cfg, TWO, Workload(512, 32, 1 << 22, (0, 4096)), "2x3090").plan  # 64 GB of KV
    assert any("no placement fits" in n for n in big.notes)


def test_bad_workloads() -> None:
    for kw in ({"ubatch": 0}, {"pp_weight": 0, "tg_weight": 0}, {"depths": (4096,), "ctx": 4096},
               {"depths": (0, 512), "depth_weights": (1.0,)}):
        with pytest.raises(WorkloadError):
            Workload(**kw)  # type: ignore[arg-type]


SYSTEMS = ("2x3090", "2x3090-nvlink", "2x4090", "2xA6000", "2xH200", "4x3090")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), hw=st.sampled_from(SYSTEMS), engine=st.sampled_from(("ik_llama.cpp", "graphir-cuda")),
       quant=st.sampled_from(("q8_0", "bf16", "q4_0")), n=st.integers(2, 4))
def test_auto_never_below_99_percent_of_layer_and_graph(cfg, hw: str, engine: str, quant: str, n: int) -> None:
    n = min(n, 4 if hw.startswith("4x") else 2)
    g = build(cfg, BuildOptions(phase="pp", quant=scheme(quant), kv_type="q8_0", logits="last"))  # type: ignore[arg-type]
    plan = place_auto(g, cfg, tuple(f"cuda:{k}" for k in range(n)), Workload(256, 16, 2048), hw, engine).plan
    (lp, lt), (gp, gt) = plan.reference["layer"], plan.reference["graph"]
    best_pp, best_tg = np.minimum(lp, gp), np.minimum(lt, gt)

    def worst(pp: np.ndarray, tg: np.ndarray) -> float:  # its worst row against the better mode
        return float(np.minimum(best_pp / pp, best_tg / tg).min())

    # never a worse worst row than either standard mode (auto has both among its candidates) ...
    assert worst(plan.chosen_pp, plan.chosen_tg) >= max(worst(lp, lt), worst(gp, gt)) - 1e-9
    # ... and within 1 % of the better one on every row where switching layouts is not needed
    # (one mode wins PP and TG alike); otherwise a switch costs copies the rig may not repay
    if worst(lp, lt) >= 1 - 1e-12 or worst(gp, gt) >= 1 - 1e-12:
        assert np.all(plan.chosen_pp <= best_pp / 0.99) and np.all(plan.chosen_tg <= best_tg / 0.99)


def test_registered_pass_in_a_pipeline() -> None:
    import planner.placement  # noqa: F401  (the planner registers `place_auto` with the passes)
    from passes import PassContext, run_pipeline

    cfg = load_preset("qwen3-14b").with_layers(2)
    g = build(cfg, BuildOptions(phase="tg", quant=scheme("Q4_0"), logits="last"))
    ctx = PassContext(cfg=cfg, devices=TWO, options=(("workload", Workload(512, 32, 4096)),))
    res = run_pipeline(g, ("place_auto", "merge_qkv"), ctx)
    assert res.graph.placed and res.graph.info["split"] == "auto"
