"""Hardware, link, system and engine profiles: shipped data, resolution, user files, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.costmodel.profiles import Engine, engine_names, engine_yaml, load_engine
from hardware.profiles import ProfileError, gpus, links, resolve_system, system_specs
from graphir.errors import GraphirError


def test_required_gpus_links_systems_engines_ship() -> None:
    for g in ("RTX 3090", "RTX 4090", "RTX A6000", "A100 80GB", "H100 SXM", "H200 SXM"):
        assert g in gpus()
    for lk in ("pcie3", "pcie3-p2p", "pcie4", "pcie4-p2p", "pcie5", "pcie5-p2p", "nvlink-bridge", "nvlink3", "nvlink4"):
        assert lk in links()
    for s in ("2x3090", "2x3090-nvlink", "4x3090", "2x4090", "2xA6000", "2xH200", "8xH100", "1xH200"):
        assert s in system_specs()
        resolve_system(s)
    assert {"ik_llama.cpp", "graphir-cuda"} <= set(engine_names())


def test_fp16_vs_fp32_accumulate_on_geforce() -> None:
    g = gpus()["RTX 3090"]
    assert g.rate("fp16_acc16") == pytest.approx(2 * g.rate("fp16"))
    assert gpus()["A100 80GB"].rate("fp16_acc16") == gpus()["A100 80GB"].rate("fp16")
    assert gpus()["RTX 3090"].rate("fp8") == g.rate("fp16")  # no fp8 units: runs as fp16


def test_h200_measurements_recorded() -> None:
    h = gpus()["H200 SXM"]
    assert h.measured["bf16"] == pytest.approx(803)
    assert h.measured["mem_bw_GBps"] == pytest.approx(4240)


def test_system_shorthand_and_p2p() -> None:
    s = resolve_system("3xH200")
    assert s.count == 3 and s.gpu.name == "H200 SXM" and s.link.name == "nvlink4"
    assert resolve_system("2x4090-pcie4-p2p").link.p2p
    assert not resolve_system("2x3090").link.p2p
    assert resolve_system("2x3090-nvlink").link.p2p


def test_user_hw_file(tmp_path: Path) -> None:
    f = tmp_path / "rig.yaml"
    f.write_text("gpus:\n  My GPU: {rates: {fp32: 10, fp16: 40}, mem_bw_GBps: 500, mem_GB: 16, tdp_W: 200, idle_W: 10}\n"
                 "system: {gpu: My GPU, count: 2, link: pcie4-p2p}\n")
    s = resolve_system(f)
    assert s.count == 2 and s.gpu.mem_bw_GBps == 500 and s.gpu.rate("int8") == pytest.approx(80e12)


@pytest.mark.parametrize("bad", ["9x9999", "nonsense", "missing.yaml"])
def test_unknown_hw_is_a_user_error(bad: str) -> None:
    with pytest.raises(GraphirError):
        resolve_system(bad)


def test_bad_engine_file(tmp_path: Path) -> None:
    f = tmp_path / "e.yaml"
    f.write_text("name: x\nlaunch_us: -1\n")
    with pytest.raises(ProfileError):
        load_engine(f)
    with pytest.raises(ProfileError):
        load_engine("no-such-engine")


def test_engine_yaml_round_trips(tmp_path: Path) -> None:
    for name in engine_names():
        e = load_engine(name)
        f = tmp_path / f"{name}.yaml"
        f.write_text(engine_yaml(e))
        assert load_engine(f) == e


def test_shipped_ik_profile_is_calibrated_and_physical() -> None:
    e: Engine = load_engine("ik_llama.cpp")
    from planner.dataset import load_manifest

    assert e.calibration is not None
    assert set(e.calibration["data"]) == {c.table for c in load_manifest()[0].cases}  # jointly, on every table
    assert 1.0 <= e.graph_launch_us <= 6.0  # per kernel, replayed from a CUDA graph
    assert 10.0 <= e.allreduce_us + e.graph_launch_us <= 100.0  # a decode reduce: tens of us on PCIe
    for p in e.fit:
        lo, hi = e.bounds[p]
        assert lo <= e.param(p) <= hi, p


def test_graphir_cuda_profile_prices_the_graph_graphir_run_executes() -> None:
    """The engine's passes are the CUDA backend's defaults, so launch and host-node counts of a
    prediction are those of the executed graph (a fit of one against the other is meaningless)."""
    from backends.costmodel.profiles import load_engine
    from cli.run import DEFAULT_PASSES

    assert load_engine("graphir-cuda").passes == DEFAULT_PASSES.split(",")
    assert load_engine("ik_llama.cpp").passes == []


def test_engine_passes_cut_the_priced_launches() -> None:
    from passes.manager import engine_graph
    from planner.placement import PlaceOptions, place
    from backends.costmodel.price import price
    from graphir.models import BuildOptions
    from graphir.models.sources import load_preset
    from graphir.quant import scheme

    cfg = load_preset("qwen3-next-80b-a3b")
    opts = BuildOptions(phase="tg", quant=scheme("bf16"), kv_type="bf16", logits="last")
    g = place(cfg, opts, PlaceOptions("layer", ("cuda:0", "cuda:1")))
    fused = engine_graph(g, cfg, ["fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate",
                                  "contiguous_heads", "fuse_delta_net_gates"])
    a, b = price(g), price(fused)
    assert b.launches.sum() < 0.8 * a.launches.sum()  # ~37 -> ~20 kernels a delta-net layer
    # the same bytes are read (a merged weight's matmul books them as activation bytes: it reads a concat)
    tot_a, tot_b = a.wbytes.sum() + a.actbytes[0].sum(), b.wbytes.sum() + b.actbytes[0].sum()
    assert abs(tot_b - tot_a) < 0.02 * tot_a
