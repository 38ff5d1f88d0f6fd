"""ik_llama.cpp's MoE expert matmul (MUL_MAT_ID, backends/costmodel/mmid.py) against the kernel
table it was measured from, its monotonicity, and its use by the timeline."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from backends.costmodel import mmid, mmid_table
from backends.costmodel.price import price
from backends.costmodel.profiles import Engine, load_engine
from backends.costmodel.timeline import node_costs
from graphir.models import BuildOptions
from graphir.models.sources import load_preset
from graphir.quant import scheme
from hardware.profiles import GPU, System, resolve_system
from planner.placement import PlaceOptions, place

TABLE = Path(__file__).resolve().parents[3] / "docs" / "results" / "h200_2026-12-03" / "ik_ops.csv"
TYPES = ("q8_0", "q4_0", "iq4_xs", "q4_k", "q6_k", "iq4_ks")


@lru_cache(maxsize=None)
def _h200() -> tuple[System, GPU, Engine]:
    sysm = resolve_system("1xH200")
    eng = load_engine("ik_llama.cpp").for_gpu(sysm.gpu)
    gpu = eng.run_gpu(sysm.gpu)  # the clock ik's kernels held when they were timed
    return sysm.with_(gpu=gpu), gpu, eng


def _errors(eng: Engine) -> np.ndarray:
    _, gpu, _ = _h200()
    rows = mmid.kernel_rows(TABLE)
    return np.array([mmid.kernel_seconds(r.case, gpu, eng) * 1e6 / r.us - 1.0 for r in rows])


def test_kernel_rows_are_reproduced() -> None:
    """Every quantised MUL_MAT_ID row of the H200 table (6 types x 4 shapes x 512/2048 tokens)
    within 15 %, median within 5 %."""
    rows = mmid.kernel_rows(TABLE)
    assert len(rows) == 48 and {r.case.wtype for r in rows} == set(TYPES)
    err = np.abs(_errors(_h200()[2]))
    assert np.median(err) <= 0.05 and err.max() <= 0.15, (np.median(err), err.max())


def test_every_term_is_needed() -> None:
    """Without routing, without the slot grid or without the tile padding the same rows miss
    by far more (worst row over 25 %, against under 15 % with all): each term carries measured time."""
    eng = _h200()[2]
    for change in ({"mmid_route_us": 0.0}, {"mmid_slot_us": 0.0}, {"mmid_tile": 8}):
        err = np.abs(_errors(eng.model_copy(update=change)))
        assert err.max() > 0.25 and np.median(err) > 2 * np.median(np.abs(_errors(eng))), change


def test_shipped_values_are_the_kernel_fit() -> None:
    """The profile's three MMQ-id values are the least-squares fit to the kernel rows (nothing
    fitted to sweep tables)."""
    _, gpu, eng = _h200()
    route, slot, eff = mmid.fit_rows(mmid.kernel_rows(TABLE), gpu, eng)
    assert route == pytest.approx(eng.mmid_route_us, rel=0.01)
    assert slot == pytest.approx(eng.mmid_slot_us, rel=0.01)
    assert eff == pytest.approx(eng.mmid_eff, rel=0.01) and eff < 1.0
    assert not {"mmid_route_us", "mmid_slot_us", "mmid_eff"} & set(eng.fit)


def test_routing_steps_follow_the_kernel_versions() -> None:
    assert mmid.route_steps(2048, 8) == 512  # 4 tokens a step: 32 lanes over 8 experts
    assert mmid.route_steps(2048, 6) == 512  # 6 runs as 8
    assert mmid.route_steps(2048, 10) == 2048  # the generic version: one token a step
    assert mmid.tile_width(2048, 128) == 128 and mmid.tile_width(20, 128) == 24


def test_padded_columns_match_a_sampled_routing() -> None:
    """The binomial expectation against routings drawn like the benchmark's (k distinct experts
    per token)."""
    T, E, k, x = 512, 128, 8, 128
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(40):
        counts = np.bincount(np.concatenate([rng.choice(E, k, replace=False) for _ in range(T)]), minlength=E)
        draws.append((x * np.ceil(counts / x)).sum())
    assert mmid.padded_columns(T, E, k, x) == pytest.approx(np.mean(draws), rel=0.02)


shape = st.tuples(st.sampled_from(TYPES), st.sampled_from((256, 512, 768, 2048)), st.sampled_from((256, 512, 2048)),
                  st.integers(2, 512), st.integers(1, 16))


@settings(max_examples=60, deadline=None)
@given(shape, st.integers(9, 4096), st.integers(1, 4096))
def test_more_tokens_never_cheaper(s, t1, dt) -> None:
    wtype, rows, inner, E, k = s
    k = min(k, E)
    _, gpu, eng = _h200()
    a = mmid.kernel_seconds(mmid.Expert(wtype, rows, inner, t1, E, k), gpu, eng)
    b = mmid.kernel_seconds(mmid.Expert(wtype, rows, inner, t1 + dt, E, k), gpu, eng)
    assert b >= a * (1 - 1e-9)


@settings(max_examples=60, deadline=None)
@given(shape, st.integers(9, 4096), st.integers(1, 256))
def test_more_experts_touched_never_cheaper(s, T, dE) -> None:
    """More experts in the weight with the same routing per token: more of them touched (and
    more tile slots), never a cheaper kernel. Where experts get more than a tile of tokens each
    (2 experts, 265 tokens: two tiles each; 3 experts: one) spreading them wider saves padded
    tiles, in the kernel as in the model; the domain is the MoE one, up to 32 tokens an expert."""
    wtype, rows, inner, E, k = s
    E, k = max(E, 16), min(k, E)
    T = min(T, 32 * E // k)
    _, gpu, eng = _h200()
    e1, e2 = mmid.Expert(wtype, rows, inner, T, E, k), mmid.Expert(wtype, rows, inner, T, E + dE, k)
    assert mmid.touched(e2) >= mmid.touched(e1)
    assert mmid.kernel_seconds(e2, gpu, eng) >= mmid.kernel_seconds(e1, gpu, eng) * (1 - 1e-9)


@lru_cache(maxsize=None)
def _qwen3next_pp():
    cfg = load_preset("qwen3-next-80b-a3b").with_layers(4)
    g = place(cfg, BuildOptions(phase="pp", quant=scheme("IQ4_XS"), kv_type="f16", logits="last"),
              PlaceOptions("layer", ("cuda:0",)))
    return cfg, price(g, 2048)


def test_timeline_prices_expert_matmuls_as_the_kernel() -> None:
    """The gate, up and down expert matmuls of a Qwen3-Next layer cost what mmid says (plus a
    launch); up reads the same activations and routing as gate and pays no routing pass."""
    cfg, pr = _qwen3next_pp()
    sysm, gpu, eng = _h200()
    cost, _ = node_costs(pr, sysm, eng, np.array([0.0]))
    ix = {n: i for i, n in enumerate(pr.names)}
    layer = next(n.split(".")[1] for n in pr.names if n.endswith("ffn_gate_exps"))
    gate, up, down = (ix[f"blk.{layer}.ffn_{r}_exps"] for r in ("gate", "up", "down"))
    assert pr.moe[3][gate] == 1 and pr.moe[3][up] == 0 and pr.moe[3][down] == 1
    launch = eng.launch_us * 1e-6
    E, k, H, N = cfg.n_expert, cfg.n_expert_used, cfg.hidden_size, cfg.moe_intermediate_size
    for i, (rows, inner, routes) in ((gate, (N, H, True)), (up, (N, H, False)), (down, (H, N, True))):
        want = mmid.kernel_seconds(mmid.Expert("iq4_xs", rows, inner, 2048, E, k, routes=routes), gpu, eng)
        # the node's bytes also count its activations: at most a few % over the weight read
        assert cost[i, 0] - launch == pytest.approx(want, rel=0.05)
    steps = mmid.route_steps(2048, k) * eng.mmid_route_us * 1e-6
    assert cost[gate, 0] - cost[up, 0] == pytest.approx(steps, rel=1e-6)


def test_engines_without_the_kernel_keep_the_dense_term() -> None:
    """graphir-cuda runs its own expert kernels: mmid is off there, and in decode everywhere."""
    _, pr = _qwen3next_pp()
    assert not mmid.nodes(pr, load_engine("graphir-cuda")).any()
    assert mmid.nodes(pr, _h200()[2]).sum() == 3 * sum(1 for n in pr.names if n.endswith("ffn_gate_exps"))


def test_table_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert mmid_table.main([str(TABLE)]) == 0
    out = capsys.readouterr().out
    assert "fit to 48 rows" in out and len(out.splitlines()) == 48 + 3
    bad = tmp_path / "ops.csv"
    bad.write_text("op,type,m,n,k,extra,runs,us,tflops,gbps\nMUL_MAT,q8_0,4096,1,4096,,1,7.6,4.4,2335\n")
    for args in ([str(bad)], [str(tmp_path / "missing.csv")], [str(TABLE), "9x9999"], []):
        assert mmid_table.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_a_bigger_ubatch_of_a_moe_model_never_takes_less_time() -> None:
    """The whole prefill of Qwen3-30B-A3B (128 experts, top 8) and Qwen3-Next (512, top 10) on
    one H200 and on a 3090 pair (graph split: experts split over both) grows with the u-batch,
    across tile boundaries and the routing versions."""
    from backends.costmodel.timeline import evaluate

    eng = load_engine("ik_llama.cpp")
    for model in ("qwen3-30b-a3b", "qwen3-next-80b-a3b"):
        cfg = load_preset(model).with_layers(4)
        for hw, split in (("1xH200", "layer"), ("2x3090", "graph")):
            sysm = resolve_system(hw)
            g = place(cfg, BuildOptions(phase="pp", quant=scheme("Q4_0"), kv_type="f16", logits="last"),
                      PlaceOptions(split, tuple(f"cuda:{i}" for i in range(min(2, sysm.count)))))
            ubs = (9, 100, 128, 129, 600, 2048, 2049)
            t = [evaluate(price(g, T), sysm, eng, np.array([0.0])).total[0] for T in ubs]
            assert np.all(np.diff(t) > 0), (model, hw, t)
