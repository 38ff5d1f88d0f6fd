"""ik_llama.cpp on Hopper: its kernels priced at the clock they held when timed (clock_eff), and
the KQ mask its host builds before every forward pass (mask_ns)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from backends.costmodel.mmq_table import one_matmul
from backends.costmodel.price import price
from backends.costmodel.profiles import load_engine
from backends.costmodel.timeline import evaluate, mask_seconds, node_costs
from hardware.profiles import resolve_system
from planner.placement import PlaceOptions
from planner.predict import place_and_price
from graphir.models.sources import load_source

OPS = Path(__file__).resolve().parents[3] / "docs" / "results" / "h200_2026-12-03" / "ik_ops.csv"


def _kernel_us(op: str, wtype: str, n: int, m: int, k: int) -> float:
    for r in csv.reader(OPS.open(encoding="utf-8")):
        if r and r[0] == op and r[1] == wtype and (int(r[2]), int(r[3]), int(r[4])) == (n, m, k):
            return float(r[7])
    raise AssertionError(f"no {op} {wtype} {n}x{m}x{k} row in {OPS.name}")


@pytest.mark.parametrize("wtype", ["q8_0", "q4_0", "iq4_xs", "iq4_ks", "q4_K", "q6_K"])
def test_ik_mmq_on_hopper_follows_its_kernel_rows(wtype: str) -> None:
    """A prefill GEMM at the sweep's shapes is priced at the rate ik's MMQ kernel was measured at
    (ik_ops.csv: the kernels held 1980 MHz for seconds, ik_sustain.csv), not at the clock a
    large torch matmul drops to (the GPU's tensor_clock_eff)."""
    sysm, eng = resolve_system("1xH200"), load_engine("ik_llama.cpp")
    for n, k in ((4096, 4096), (12288, 4096), (4096, 12288)):
        pr = price(one_matmul(wtype.lower(), n, k), 2048)
        t = node_costs(pr, sysm, eng, np.array([0.0]))[0][0, 0] * 1e6
        assert t == pytest.approx(_kernel_us("MUL_MAT", wtype, n, 2048, k), rel=0.04), (n, k)
    # an engine without its own clock takes the GPU's sustained one
    graphir = load_engine("graphir-cuda")
    assert graphir.run_gpu(sysm.gpu).tensor_clock_eff == sysm.gpu.tensor_clock_eff < 1.0
    assert eng.run_gpu(sysm.gpu).tensor_clock_eff == 1.0


def _qwen3_pp_tg(layers: int = 2):
    cfg = load_source("qwen3-8b").cfg.with_layers(layers)
    po = PlaceOptions("layer", ("cuda:0",), None, None, "single")  # type: ignore[arg-type]
    pp, tg, _ = place_and_price(cfg, "q8_0", "f16", po, 2048, ())
    return pp, tg


def test_host_mask_is_tokens_times_padded_cache_rows() -> None:
    """ik's set_inputs fills a (cache rows in view) x tokens mask on the host: from 32 tokens and
    1024 rows on `mask_threads` threads share it, a decode step's single row is one thread's."""
    sysm, eng = resolve_system("1xH200"), load_engine("ik_llama.cpp")
    assert eng.mask_ns > 0 and eng.mask_threads > 1
    off = eng.model_copy(update={"mask_ns": 0.0})
    pp, tg = _qwen3_pp_tg()
    kv = np.array([0.0, 2048.0, 16384.0, 16500.0])
    d_pp = evaluate(pp, sysm, eng, kv).total - evaluate(pp, sysm, off, kv).total
    rows = np.array([2048.0, 4096.0, 18432.0, 18688.0])  # kv + 2048 tokens, padded to 256
    assert d_pp == pytest.approx(2048 * rows * eng.mask_ns * 1e-9 / eng.mask_threads)
    d_tg = evaluate(tg, sysm, eng, kv).total - evaluate(tg, sysm, off, kv).total
    assert d_tg == pytest.approx(np.array([256.0, 2304.0, 16640.0, 16640.0]) * eng.mask_ns * 1e-9)
    # the host term is part of the launch/sync share of the breakdown, which still sums to the total
    tl = evaluate(pp, sysm, eng, kv)
    assert tl.terms.sum(axis=0) == pytest.approx(tl.total)
    # a graph without attention builds no mask
    assert not mask_seconds(price(one_matmul("q8_0", 4096, 4096), 2048), eng, kv).any()


def test_kernel_and_gap_tables_print_and_refuse_bad_input(capsys) -> None:
    from backends.costmodel import mmq_table
    from planner import gap_table

    assert mmq_table.main([str(OPS)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nq8_0 ") == 7 and "|err| median" in out
    manifest = OPS.parent / "ik_cases.yaml"
    assert gap_table.main([str(manifest)]) == 0
    out = capsys.readouterr().out
    assert out.count("missing") == 12 and "host KQ mask" in out  # six runs, PP and TG
    for bad in (mmq_table.main(["no_such.csv"]), gap_table.main(["no_such.yaml"])):
        assert bad == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
