"""Hypothesis properties of the cost model over models, systems, engines and placements."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from backends.costmodel.placement import PlaceOptions, place
from backends.costmodel.price import Priced, price
from backends.costmodel.profiles import load_engine, resolve_system
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
