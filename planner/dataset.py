"""The calibration set: published sweep tables with what each measured (data/measured/cases.yaml).

A case names the model, weights, KV type, rig, split mode and engine flags of one table, so the
engine profile is fitted to every table jointly (each on its own rig) and checked by leaving
each table out in turn (`graphir calibrate --cv`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.costmodel.calibrate import Case, Ratio
from backends.costmodel.options import EngineOptions, apply
from planner.placement import PlaceOptions
from planner.predict import place_and_price
from backends.costmodel.profiles import Engine
from hardware.profiles import ProfileError, read_yaml, resolve_system
from graphir.models.sources import load_source
from reports.sweep import read_table


class CaseSpec(BaseModel):
    """One line of the manifest: a measured table and the facts of its run."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    table: str
    model: str
    quant: str
    kv_type: str = "f16"
    hw: str
    split: str
    recurrent: str = "single"
    ts: tuple[float, ...] | None = None
    layers: int | None = None  # the run held only the model's first N layers (a truncated file)
    options: EngineOptions = EngineOptions()
    ratios: tuple[dict[str, float], ...] = ()  # {n_kv, pp, tg}: other mode (graph) over this one
    why: str = ""  # where the facts the table's first line does not state come from


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    engine: str
    cases: tuple[CaseSpec, ...] = Field(min_length=1)


def shipped_dir() -> Path:
    return Path(str(resources.files("backends.costmodel") / "data" / "measured"))


def load_manifest(path: str | Path | None = None) -> tuple[Manifest, Path]:
    """The manifest (default: the shipped calibration set) and the folder its tables are in."""
    p = Path(path) if path is not None else shipped_dir() / "cases.yaml"
    if not p.is_file():
        raise ProfileError(f"{p}: no such calibration manifest")
    doc = read_yaml(p.read_text(encoding="utf-8"), str(p))
    try:
        man = Manifest.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise ProfileError(f"{p}: {loc}: {err.get('msg', '')}") from None
    for c in man.cases:
        if not (p.parent / c.table).is_file():
            raise ProfileError(f"{p}: case table {c.table} is missing beside the manifest")
    return man, p.parent


def build_case(spec: CaseSpec, folder: Path, eng: Engine) -> Case:
    """Price the case's model as its table ran (its rig, split, flags)."""
    sysm = resolve_system(spec.hw)
    _, sysm, extra = apply(spec.options, eng, sysm, spec.split)
    src = load_source(spec.model)
    cfg = src.cfg.with_layers(spec.layers) if spec.layers else src.cfg
    table = read_table(folder / spec.table)
    ubs = sorted({r.pp for r in table.rows})
    if len(ubs) != 1:
        raise ProfileError(f"{spec.table}: rows mix u-batch sizes {ubs}")
    kv = spec.options.kv_type_k or spec.kv_type

    def priced(split: str) -> tuple[Any, Any]:
        po = PlaceOptions(split, sysm.devices, spec.ts, spec.options.max_gpu, spec.recurrent)  # type: ignore[arg-type]
        pp, tg, _ = place_and_price(cfg, spec.quant, kv, po, ubs[0], tuple(eng.passes) + extra, eng.act_dtype)
        return pp, tg

    pp, tg = priced(spec.split)
    ratios = tuple(Ratio(int(r["n_kv"]), r.get("pp"), r.get("tg")) for r in spec.ratios)
    other = None
    if ratios:
        other = priced("graph" if spec.split == "layer" else "layer")
    return Case(Path(spec.table).stem, pp, tg, table, sysm, spec.options, spec.split, ratios, other)


def build_cases(eng: Engine, manifest: str | Path | None = None, only: Sequence[str] = (),
                loaded: tuple[Manifest, Path] | None = None) -> list[Case]:
    """Every case of the manifest (or those whose table stem is in `only`), priced; `loaded`:
    the manifest as `load_manifest` already read it."""
    from reports.progress import track

    man, folder = loaded or load_manifest(manifest)
    specs = [c for c in man.cases if not only or Path(c.table).stem in only]
    return [build_case(s, folder, eng) for s in track(specs, "place and price")]
