"""The shipped ik_llama.cpp profile against the whole calibration set (published sweeps), the
manifest that describes it, leave-one-out, and the rule that no profile key names a model."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

from backends.costmodel.calibrate import cross_validate, fit, predict_ratios, predict_speeds
from planner.dataset import build_cases, load_manifest
from backends.costmodel.options import OptionError, apply, parse_flags
from backends.costmodel.profiles import engine_names, load_engine
from hardware.profiles import ProfileError, resolve_system
from cli.main import main
from graphir.models.sources import load_preset

DATA = resources.files("backends.costmodel") / "data"


@pytest.fixture(scope="module")
def ik_cases():
    eng = load_engine("ik_llama.cpp")
    return eng, build_cases(eng)


def test_manifest_names_every_table_and_only_real_ones() -> None:
    man, folder = load_manifest()
    listed = {c.table for c in man.cases}
    on_disk = {p.name for p in Path(str(folder)).glob("*.csv") if p.name != "graph_vs_layer_ratios.csv"}
    assert listed == on_disk  # every published table is a case, none is left out of the fit
    for c in man.cases:
        first = (folder / c.table).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("#") and ("PR" in first or "ikawrakow" in first)  # its source line


def test_shipped_profile_reproduces_every_table(ik_cases) -> None:
    """In-sample accuracy of the shipped (jointly fitted) profile: median |error| per table."""
    eng, cases = ik_cases
    for c in cases:
        s_pp, s_tg = predict_speeds(c, None, eng)
        m_pp = np.array([r.s_pp_tps for r in c.table.rows])
        m_tg = np.array([r.s_tg_tps for r in c.table.rows])
        assert np.median(np.abs(s_pp / m_pp - 1)) < 0.12, c.label
        assert np.median(np.abs(s_tg / m_tg - 1)) < 0.10, c.label


def test_published_graph_layer_ratio(ik_cases) -> None:
    eng, cases = ik_cases
    rat = [r for c in cases for r in predict_ratios(c, None, eng)]
    assert rat, "the manifest carries Qwen3-14B's published graph/layer ratios"
    for label, pred, want in rat:
        assert abs(pred / want - 1) <= 0.10, (label, pred, want)


def test_leave_one_out_runs_and_reports_held_out_error(ik_cases) -> None:
    """Mechanics on three small tables and two parameters (the full run is `graphir calibrate --cv`)."""
    eng, cases = ik_cases
    small = [c for c in cases if c.label.startswith(("qwen3_14b", "duskmiqu", "llama3_70b"))]
    held = cross_validate(small, None, eng, ["mem_eff", "gemm_eff"], max_iter=4)
    assert set(held) == {c.label for c in small}
    for st in held.values():
        assert 0 <= st["pp"]["median"] < 1 and 0 <= st["tg"]["median"] < 1
    # held-out error is never better than the in-sample error of a fit that saw the table
    res = fit(small, None, eng, ["mem_eff", "gemm_eff"], max_iter=4)
    worst_in = max(max(s["pp"]["median"], s["tg"]["median"]) for s in res.per_case.values())
    worst_out = max(max(s["pp"]["median"], s["tg"]["median"]) for s in held.values())
    assert worst_out >= worst_in - 1e-9


def _model_names() -> list[str]:
    from graphir.models.sources import preset_names

    names = set(preset_names())
    names |= {c.model for c in load_manifest()[0].cases}
    return sorted(names)


def _keys(obj, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}{k}"
            if k != "calibration":  # provenance: names the data a fit used, not a parameter
                yield from _keys(v, f"{prefix}{k}.")


@pytest.mark.parametrize("engine", engine_names())
def test_no_profile_parameter_is_keyed_by_a_model(engine: str) -> None:
    doc = yaml.safe_load((DATA / f"engine_{engine}.yaml").read_text(encoding="utf-8"))
    stems = {re.sub(r"[^a-z0-9]", "", m.lower()) for m in _model_names()}
    families = {load_preset(m).arch for m in _model_names()}
    for key in _keys({k: v for k, v in doc.items() if k != "calibration"}):
        for part in key.split("."):
            flat = re.sub(r"[^a-z0-9]", "", part.lower())
            assert flat not in stems, f"{engine}: {key} is keyed by a model"
            assert part not in families, f"{engine}: {key} is keyed by a model family"
            assert not re.search(r"(llama|qwen|mistral|gemma|deepseek|\d+b$)", flat), f"{engine}: {key}"


def test_engine_flags_parse_and_refuse_unknown() -> None:
    o = parse_flags("-sas -grt q8_0 --max-gpu 2 -mqkv -ub 1024 -b 2048 -fa on --no-nccl -ngl 99")
    assert (o.async_scheduler, o.reduce_type, o.max_gpu, o.merge_qkv, o.ubatch, o.nccl) == \
        (True, "q8_0", 2, True, 1024, False)
    for bad, word in (("-xyz", "unknown engine flag '-xyz'"), ("-grt f8", "f16, bf16, f32 or q8_0"),
                      ("-ub 0", "at least 1"), ("-ub 2048 -b 512", "smaller than -ub"), ("--max-gpu", "needs a value")):
        with pytest.raises(OptionError, match=re.escape(word)):
            parse_flags(bad)


def test_engine_flags_change_the_prediction() -> None:
    """Each flag that should cost or save time does, in the direction physics says."""
    from planner.predict import Workload, predict

    wl = Workload(2048, 16, 8192)

    def speeds(flags: str, split: str = "graph", hw: str = "4x3090-pcie4-p2p") -> tuple[float, float]:
        pr = predict("llama-3-70b", hw, "ik_llama.cpp", "Q4_0", "f16", (split,), workload=wl,
                     options=parse_flags(flags))
        r = pr.modes[split].rows[0]
        return r.s_pp_tps, r.s_tg_tps

    base = speeds("")
    assert speeds("-grt f32")[0] < base[0]  # f32 partials: twice the bytes of every PP reduce
    assert speeds("-grt q8_0")[0] > base[0]
    assert speeds("--no-p2p")[1] < base[1]  # staged through host memory
    assert speeds("-sas", hw="2x3090")[0] >= speeds("", hw="2x3090")[0]
    layer = speeds("", "layer")
    assert speeds("-mqkv", "layer")[1] > layer[1]  # one mat-vec instead of three
    assert speeds("-fa off", "layer")[0] < layer[0]
    with pytest.raises(OptionError, match="needs flash attention"):
        apply(parse_flags("-fa off"), load_engine("ik_llama.cpp"), resolve_system("2x3090"), "graph")


def test_cli_refuses_unknown_engine_flag(capsys) -> None:
    assert main(["predict", "qwen3-8b", "--ctx", "4096", "--engine-flags", "-sas --turbo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--turbo" in err


def test_cli_calibrate_defaults_to_the_calibration_set(tmp_path, capsys) -> None:
    man, folder = load_manifest()
    sub = tmp_path / "cases.yaml"
    keep = [c.model_dump(mode="json", exclude_defaults=True) for c in man.cases if c.table.startswith("qwen3_14b")]
    for c in keep:
        c["table"] = str(folder / c["table"])
    sub.write_text(yaml.safe_dump({"engine": man.engine, "cases": keep}))
    assert main(["calibrate", "--manifest", str(sub), "--fit", "mem_eff,gemm_eff"]) == 0
    out = capsys.readouterr().out
    assert "qwen3_14b_q4_0_2x3090_layer PP" in out and "graph/layer pp@40960" in out
    with pytest.raises(ProfileError, match="no such calibration manifest"):
        load_manifest(tmp_path / "none.yaml")
