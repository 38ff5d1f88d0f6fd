"""`graphir predict`, `graphir calibrate`, `graphir compare`: thin wrappers over the library."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from cli import options as O
from cli.common import default_split, output_path, plot_path
from graphir.errors import GraphirError
from graphir.fileio import write_output
from reports.sweep import SweepTable, TableError, parse_table, read_table
from reports.sweep_compare import compare as compare_tables


if TYPE_CHECKING:
    from backends.costmodel.calibrate import Case
    from backends.costmodel.profiles import Engine
    from hardware.profiles import System


class CostModelCliError(GraphirError):
    """A bad option or file given to a cost-model verb."""


def _read(path: Path) -> SweepTable:
    try:
        return read_table(path)
    except TableError as e:
        try:  # `predict --format json` nests its rows per mode: read them with their split
            doc = json.loads(path.read_text(encoding="utf-8"))
            rows = [r | {"split": k} for k, m in doc["modes"].items() for r in m["rows"]]
            return parse_table(json.dumps({"rows": rows}), str(path), path.stem)
        except (ValueError, TypeError, KeyError, AttributeError, TableError):
            raise CostModelCliError(str(e)) from None


def split_tables(path: Path, table: SweepTable, split: str | None) -> list[tuple[str, SweepTable]]:
    """(split, rows) per split of a table: its split column, else `split`, else the file name
    (`..._layer.md`), else '' (unknown); `split` also filters a table that has several."""
    if table.splits():
        names = [s for s in table.splits() if split in (None, s)]
        return [(s, table.by_split(s)) for s in names]
    named = [w for w in ("layer", "graph", "auto") if w in re.split(r"[^a-z]+", path.stem.lower())]
    return [(split or (named[0] if len(named) == 1 else ""), table)]


def run_label(label: str, recurrent: str = "single") -> tuple[str, str]:
    """A table's split label -> (split mode, recurrent placement). `graphir run` labels graph
    split of a model with delta-net layers `graph-single` / `graph-split`."""
    mode, _, rec = label.partition("-")
    if mode not in ("layer", "graph", "auto") or (rec and (mode != "graph" or rec not in ("single", "split"))):
        raise CostModelCliError(f"split {label!r}: expected layer, graph, graph-single, graph-split or auto")
    return mode, rec or recurrent


def _base(label: str) -> str:
    """graph-single and graph-split (a measured run's labels) align with a prediction's graph."""
    return label.partition("-")[0]


def _emit(text: str, output: Path | None) -> None:
    write_output(output if output is not None else "-", text)


def predict_cmd(
    model: str = typer.Argument(..., help="preset name, config.json, checkpoint dir or .gguf"),
    hw: O.Hw = O.HW_DEFAULT, engine: O.Engine = O.ENGINE_DEFAULT,
    quant: O.Quant = None,
    kv_type: O.KvType = "f16",
    split: O.Split = None, user_pass: O.UserPass = None, ts: O.Ts = None, max_gpu: O.MaxGpu = None,
    recurrent: O.Recurrent = "single",
    gpus: Optional[int] = typer.Option(None, "--gpus", help="use only the first N GPUs of the system"),
    ubatch: int = typer.Option(2048, "--ubatch", "-ub", help="u-batch = PP tokens per row"),
    tg: int = typer.Option(128, "--tg", help="tokens generated per row"),
    ctx: int = typer.Option(98304, "--ctx", "-c", help="context size; rows at N_KV = 0, ub, 2ub, ... < ctx"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG/SVG/PDF plot here", callback=plot_path),
    measured: Optional[List[Path]] = typer.Option(None, "--measured", help="measured table to draw on the plot "
                                                  "(repeatable; split from its split column or file name)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write here instead of stdout",
                                          callback=output_path),
    engine_flags: Optional[str] = typer.Option(None, "--engine-flags", help="the engine's own flags that change "
                                               "time, as you pass them to it: \"-sas -grt f16 -mqkv --no-nccl\""),
    allow_overflow: bool = typer.Option(False, "--allow-overflow", help="predict placements that do not "
                                        "fit the GPUs' memory (a warning instead of an error)"),
) -> None:
    """Predict the llama-sweep-bench table per split mode, with breakdowns and crossovers."""
    from planner import report
    from planner.auto_report import explain
    from backends.costmodel.options import parse_flags
    from planner.placement import parse_splits
    from planner.predict import Workload, predict

    opts = parse_flags(engine_flags)
    if opts.ubatch is not None:
        ubatch = opts.ubatch
    if opts.max_gpu is not None:
        max_gpu = opts.max_gpu
    if opts.kv_type_k is not None:
        kv_type = opts.kv_type_k

    if fmt not in ("table", "csv", "json"):
        raise CostModelCliError(f"--format must be table, csv or json, got {fmt!r}")
    if recurrent not in ("single", "split"):
        raise CostModelCliError(f"--recurrent must be single or split, got {recurrent!r}")
    modes = default_split(split, user_pass, "layer,graph")
    names = parse_splits(modes) if modes else ("+".join(user_pass or ()),)
    # the measured tables are read before any work: a bad one fails first
    points = {s: t for p in measured or [] for s, t in split_tables(p, _read(p), None) if s in names}
    if measured and not points:
        raise CostModelCliError(f"--measured: no table names a predicted split ({', '.join(names)}); "
                                f"add a split column or put layer/graph in the file name")
    pred = predict(model, hw, engine, quant, kv_type, names if modes else ("",), ts, max_gpu, recurrent,
                   Workload(ubatch, tg, ctx), gpus, allow_overflow, options=opts, passes=tuple(user_pass or ()))
    for w in pred.warnings:
        typer.echo(f"warning: {w}", err=True)
    text = {"table": report.format_table, "csv": report.format_csv, "json": report.format_json}[fmt](pred)
    for name, plan in pred.plans.items():  # why auto chose what it did (CSV: '#' comments)
        why = explain(plan)
        if fmt == "table":
            text += f"\n## split mode {name}: the plan and its alternatives\n\n{why}"
        elif fmt == "csv":
            text += "".join(f"# {line}\n" if line else "#\n" for line in why.splitlines())
    _emit(text, output)
    if plot is not None:
        report.plot(pred, plot, points)


def calibrate_cmd(
    measured: Optional[List[Path]] = typer.Argument(None, help="measured sweep tables (CSV, markdown, JSONL); "
                                                    "none: the shipped calibration set (its manifest)"),
    model: Optional[str] = typer.Option(None, "--model", help="the model the tables measured; or one per table, "
                                        "comma separated, in the tables' order"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="a calibration manifest (cases.yaml: "
                                            "table, model, quant, kv_type, hw, split, options per case)"),
    cv: bool = typer.Option(False, "--cv", help="leave-one-out: fit on all tables but one, predict that one, "
                            "for each table; prints the held-out errors"),
    no_fit: bool = typer.Option(False, "--no-fit", help="fit nothing: the profile as it is against every table "
                                "(a check on runs the profile was not fitted to)"),
    hw: O.Hw = O.HW_DEFAULT,
    engine: Optional[str] = typer.Option(None, "--engine", help="starting engine profile (default: the "
                                         "manifest's, else ik_llama.cpp)"),
    quant: O.Quant = None,
    kv_type: O.KvType = "f16",
    split: Optional[str] = typer.Option(None, "--split", "-sm",
                                        help="split mode of each file without a split column, in order"),
    ts: O.Ts = None, max_gpu: O.MaxGpu = None, recurrent: O.Recurrent = "single",
    fit_params: Optional[str] = typer.Option(None, "--fit", help="parameters to fit (default: the engine's list)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="fitted engine YAML", callback=output_path),
) -> None:
    """Fit the engine's physical parameters to measured tables jointly; print them and the
    residuals (with --cv: the leave-one-out errors)."""
    from backends.costmodel.calibrate import cross_validate, fit
    from backends.costmodel.profiles import engine_yaml, load_engine
    from hardware.profiles import resolve_system

    params = [p.strip() for p in fit_params.split(",")] if fit_params else None
    if measured:
        eng = load_engine(engine or "ik_llama.cpp")
        if manifest is not None:
            raise CostModelCliError("give tables or --manifest, not both")
        if not model:
            raise CostModelCliError("--model is required with tables (or give none to use the calibration set)")
        sysm = resolve_system(hw)
        cases = _cli_cases(measured, model, sysm, eng, quant, kv_type, split, ts, max_gpu, recurrent)
        prov: dict[str, object] = {"data": [p.name for p in measured], "model": model, "hw": sysm.name,
                                   "quant": quant, "kv_type": kv_type}
    else:
        from planner.dataset import build_cases, load_manifest

        man, folder = load_manifest(manifest)
        eng = load_engine(engine or man.engine)
        sysm = None
        cases = build_cases(eng, loaded=(man, folder))
        prov = {"data": [c.table for c in man.cases], "manifest": "shipped" if manifest is None else str(manifest)}
    if no_fit:
        if cv or output is not None:
            raise CostModelCliError("--no-fit checks the profile as it is: it takes neither --cv nor -o")
        from backends.costmodel.calibrate import FitResult, _stats

        sys.stdout.write(FitResult(eng, {}, {}, 0.0, 0, _stats(cases, sysm, eng)).report())
        return
    res = fit(cases, sysm, eng, params)
    sys.stdout.write(res.report())
    if cv:
        held = cross_validate(cases, sysm, eng, params)
        sys.stdout.write("\n" + format_cv(held))
    if output is not None:
        prov |= {"fitted": {k: round(v, 6) for k, v in res.fitted.items()},
                 "residuals": {k: {m: {s: round(float(x), 5) for s, x in st.items()} for m, st in v.items()}
                               for k, v in res.per_case.items()}}
        # a profile rewritten in place keeps the comment it opens with (where its numbers come from)
        _emit(_leading_comment(output) + engine_yaml(res.engine.model_copy(update={"calibration": prov})), output)


def _leading_comment(path: Path) -> str:
    """The `#` lines an existing YAML file opens with ("" for a new file)."""
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    head = itertools.takewhile(lambda s: s.startswith("#"), lines)
    return "".join(s if s.endswith("\n") else s + "\n" for s in head)


def format_cv(held: dict[str, dict[str, dict[str, float]]]) -> str:
    """The leave-one-out table: each table's errors when it was not part of the fit."""
    lines = ["leave-one-out: each table predicted by a profile fitted on all the others",
             f"{'table':<44} {'S_PP |err| med':>14} {'bias':>7} {'S_TG |err| med':>14} {'bias':>7}  ratios"]
    for label, st in held.items():
        rat = "  ".join(f"{k.removeprefix('ratio ')} {v['predicted']:.2f} vs {v['published']:.2f}"
                        for k, v in st.items() if k.startswith("ratio "))
        lines.append(f"{label:<44} {st['pp']['median']:>14.1%} {st['pp']['bias']:>+7.1%} "
                     f"{st['tg']['median']:>14.1%} {st['tg']['bias']:>+7.1%}  {rat}")
    worst = max(max(st["pp"]["median"], st["tg"]["median"]) for st in held.values())
    lines.append(f"worst held-out median: {worst:.1%} over {len(held)} tables")
    return "\n".join(lines) + "\n"


def _cli_cases(measured: list[Path], model: str, sysm: "System", eng: "Engine", quant: str | None, kv_type: str,
               split: str | None, ts: str | None, max_gpu: int | None, recurrent: str) -> list["Case"]:
    """Cases from tables named on the command line, all on one rig (`--hw`)."""
    from backends.costmodel.calibrate import Case
    from planner.placement import parse_placement, parse_splits
    from planner.predict import place_and_price, resolve_quant
    from graphir.models.sources import load_source
    from reports.progress import track

    names = [m.strip() for m in model.split(",") if m.strip()]
    if len(names) not in (1, len(measured)):
        raise CostModelCliError(f"--model names {len(names)} models for {len(measured)} tables: give one, or one per table")
    sources = {m: load_source(m) for m in dict.fromkeys(names)}
    named = list(parse_splits(split)) if split else []
    cases, used = [], 0
    for k, path in enumerate(track(measured, "place and price")):
        src = sources[names[k if len(names) > 1 else 0]]
        cfg, q = src.cfg, resolve_quant(src, quant)
        table = _read(path)
        parts = [(s, table.by_split(s)) for s in table.splits()] if table.splits() else []
        if not parts:
            if used >= len(named):
                raise CostModelCliError(f"{path}: no split column; name its mode with --split (one per file)")
            parts, used = [(named[used], table)], used + 1
        for mode, t in parts:
            ubs = sorted({r.pp for r in t.rows})
            if len(ubs) != 1:
                raise CostModelCliError(f"{path}: rows mix u-batch sizes {ubs}; calibrate one size per table")
            split_mode, rec = run_label(mode, recurrent)
            po = parse_placement(split_mode, sysm.devices, ts, max_gpu, rec)
            pp, tg, _ = place_and_price(cfg, q, kv_type, po, ubs[0], eng.passes, eng.act_dtype)
            cases.append(Case(f"{path.stem}:{mode}", pp, tg, t))
    return cases


def compare_cmd(
    tables: List[Path] = typer.Argument(..., help="reference table (measured) first, then tables to compare with it: "
                                        "sweep-bench markdown or JSONL, graphir CSV or JSON"),
    split: Optional[str] = typer.Option(None, "--split", "-sm", help="compare only this split mode (also names the "
                                        "split of files that carry none)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG/SVG/PDF plot of speeds and errors here",
                                        callback=plot_path),
) -> None:
    """Per-depth S_PP and S_TG of each table against the first, aligned on N_KV: ratio and error."""
    if len(tables) < 2:
        raise CostModelCliError("compare needs two tables or more: the reference first, then the others")
    parts = [(p, split_tables(p, _read(p), split)) for p in tables]
    (ref_path, ref), pairs = parts[0], []
    for path, entries in parts[1:]:
        for s, t in entries:
            hits = ([r for r in ref if r[0] == s] or [r for r in ref if _base(r[0]) == _base(s)]
                    or [r for r in ref if not r[0] or not s])
            if len(hits) > 1 or (hits and not hits[0][0] and len(entries) > 1):
                names = [", ".join(x or "no split" for x, _ in e) for e in (ref, entries)]
                raise CostModelCliError(f"{ref_path.name} ({names[0]}) vs {path.name} ({names[1]}): "
                                        f"which splits to align is ambiguous; name one with --split")
            if hits:
                pairs.append((hits[0][0] or s, hits[0][1], path, t))
    if not pairs:
        raise CostModelCliError(f"no split of {', '.join(p.name for p in tables[1:])} matches "
                                f"{ref_path.name} ({', '.join(s or '?' for s, _ in ref)})")
    out, results = [], []
    for s, a, path, b in pairs:
        if a.splits() and b.splits() and a.splits() != b.splits():  # graph-single vs graph: one label
            b = SweepTable(tuple(dataclasses.replace(r, split=a.rows[0].split) for r in b), b.label)
        try:
            c = compare_tables(a, b)
        except (KeyError, TableError) as e:
            raise CostModelCliError(str(e).strip("'\"")) from None
        results.append((s, path.stem, a, b, c))
        title = f"{ref_path.name} vs {path.name}" + (f" (split {s})" if s else "")
        out.append((f"== {title}\n" if len(pairs) > 1 else "") + c.format())
    sys.stdout.write("\n".join(out))
    if plot is not None:
        from planner.report import plot_compare

        plot_compare(results, ref_path.stem, plot)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_cmd)
    app.command("calibrate")(calibrate_cmd)
    app.command("compare")(compare_cmd)
