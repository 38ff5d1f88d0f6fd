"""Hypothesis properties of the cost model over models, systems, engines and placements."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from planner.placement import PlaceOptions, place
from backends.costmodel.price import Priced, price
from backends.costmodel.profiles import load_engine
from hardware.profiles import resolve_system
from backends.costmodel.timeline import evaluate
from graphir.models import BuildOptions
from graphir.models.sources import load_preset
from graphir.quant import scheme

MODELS = ("qwen3-0.6b", "qwen3-14b", "qwen3-30b-a3b", "qwen3-next-80b-a3b", "llama-3-8b")
SYSTEMS = ("2x3090", "2x3090-nvlink", "2x4090", "2xA6000", "2xH200", "4x3090")
QUANTS = ("Q4_0", "IQ4_XS", "Q8_0", "bf16")


@lru_cache(maxsize=None)
def _priced(model: str, quant: str, kv: str, split: str, n_dev: int, phase: str) -> Priced:
    cfg = load_preset(model).with_layers(4)  # every layer kind appears within 4 layers
    opts = BuildOptions(phase=phase, quant=scheme(quant), kv_type=kv, logits="last")
    devs = tuple(f"cuda:{i}" for i in range(n_dev))
    return price(place(cfg, opts, PlaceOptions(split, devs)), 512)  # type: ignore[arg-type]


case = st.tuples(st.sampled_from(MODELS), st.sampled_from(QUANTS), st.sampled_from(("f16", "q8_0")),
                 st.sampled_from(("layer", "graph")), st.sampled_from(SYSTEMS),
                 st.sampled_from(("ik_llama.cpp", "graphir-cuda")), st.sampled_from(("pp", "tg")))
SET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SET
@given(case)
def test_time_grows_with_depth(c) -> None:
    model, quant, kv, split, hw, engine, phase = c
    sysm = resolve_system(hw)
    pr = _priced(model, quant, kv, split, min(2, sysm.count), phase)
    eng = load_engine(engine)
    kv = np.arange(0, 65536, 4096.0)
    # never faster deeper; a host-bound phase (graphir-cuda's eager prefill of a small model)
    # may stay flat while the host walking the graph is slower than the GPUs' growing work
    assert np.all(np.diff(evaluate(pr, sysm, eng, kv).total) >= 0)
    # the GPUs' own time grows with every step of depth
    assert np.all(np.diff(evaluate(pr, sysm, eng.model_copy(update={"host_us": 0.0}), kv).total) > 0)


@SET
@given(case, st.floats(1.0, 8.0), st.floats(1.0, 8.0))
def test_more_bandwidth_never_predicts_slower(c, mem_gain: float, link_gain: float) -> None:
    model, quant, kv, split, hw, engine, phase = c
    sysm = resolve_system(hw)
    pr = _priced(model, quant, kv, split, min(2, sysm.count), phase)
    eng = load_engine(engine)
    kv_depths = np.array([0.0, 8192.0, 65536.0])
    base = evaluate(pr, sysm, eng, kv_depths).total
    fast = sysm.with_(gpu=sysm.gpu.model_copy(update={"mem_bw_GBps": sysm.gpu.mem_bw_GBps * mem_gain}),
                      link=sysm.link.model_copy(update={"bw_GBps": sysm.link.bw_GBps * link_gain}))
    assert np.all(evaluate(pr, fast, eng, kv_depths).total <= base * (1 + 1e-12))


@SET
@given(case)
def test_on_one_device_layer_equals_graph(c) -> None:
    model, quant, kv, _, hw, engine, phase = c
    sysm = resolve_system(hw)
    eng = load_engine(engine)
    d = np.array([0.0, 16384.0])
    a = evaluate(_priced(model, quant, kv, "layer", 1, phase), sysm, eng, d).total
    b = evaluate(_priced(model, quant, kv, "graph", 1, phase), sysm, eng, d).total
    assert np.array_equal(a, b)


WIDE_QUANTS = ("Q4_0", "Q8_0", "Q4_K_M", "IQ4_XS", "IQ4_KS", "IQ4_KSS", "IQ2_KL", "IQ1_KT", "IQ3_K", "Q6_0", "f16",
               "bf16")
WIDE_SYSTEMS = ("2x3090", "4x3090-pcie4-p2p", "2xA6000", "1xH200", "2xH200", "2x4090", "8xH100")
wide = st.tuples(st.sampled_from(MODELS), st.sampled_from(WIDE_QUANTS), st.sampled_from(("f16", "q8_0", "q6_0", "q4_0")),
                 st.sampled_from(("layer", "graph")), st.sampled_from(WIDE_SYSTEMS),
                 st.sampled_from(("ik_llama.cpp", "graphir-cuda")), st.sampled_from(("pp", "tg")),
                 st.sampled_from(("", "-sas", "-grt f32", "-grt q8_0 --no-nccl", "-mqkv", "-fa off")))


@SET
@given(wide)
def test_predictions_are_finite_positive_monotone_and_below_the_rooflines(c) -> None:
    """Every quant type (ik's own too), KV type, rig and engine flag: a prediction is a finite
    positive time, never shorter deeper, and never faster than the rigs' memory and compute
    roofs allow (all GPUs streaming at datasheet bandwidth, computing at their top rate)."""
    from backends.costmodel.options import OptionError, apply, parse_flags

    model, quant, kv, split, hw, engine, phase, flags = c
    sysm = resolve_system(hw)
    n = min(2, sysm.count) if split == "layer" else min(4, sysm.count)
    try:
        eng, sysm, _ = apply(parse_flags(flags), load_engine(engine), sysm, split)
    except OptionError:
        return  # -fa off under graph split: refused by name, tested elsewhere
    pr = _priced(model, quant, kv, split, n, phase)
    depths = np.array([0.0, 4096.0, 32768.0])
    tl = evaluate(pr, sysm, eng, depths)
    assert np.all(np.isfinite(tl.total)) and np.all(tl.total > 0)
    assert np.all(np.diff(tl.total) >= 0)
    gpu = sysm.gpu
    mem_roof = (tl.work["weight_bytes"] + tl.work["kv_bytes"]) / (n * gpu.mem_bw_GBps * 1e9)
    top_rate = max(gpu.rate(k) for k in gpu.rates)
    compute_roof = tl.work["flops"] / (n * top_rate)
    assert np.all(tl.total >= mem_roof * (1 - 1e-9))
    assert np.all(tl.total >= compute_roof * (1 - 1e-9))
