"""CLI verbs of the passes package: `place`, `nodes`, `passes`.

Pipeline of `place` / `nodes`: the `--split` placement first (if any), then `--passes` and
`--pass` entries in the order given (merges commute with placement, and running them after it
merges each device's slices), then the memory check when `--mem` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import typer

from cli.common import default_split, emit, output_path, source_quant
from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from graphir.models.sources import load_source, weights_label
from graphir.ops import Op
from graphir.serialize import to_json
from graphir.text import to_text

from planner.auto import AutoPlan, AutoWorkload, place_auto
from passes.count import count_nodes, estimate_nodes
from passes.devices import parse_devices, parse_ts
from passes.manager import PassContext, PipelineResult, registered, run_pipeline
from passes.memory import GIB, describe, fit_problem, parse_mem, plan_memory

SPLITS = ("layer", "graph", "auto")


def build_pipeline(split: str | None, passes: str | None, user: Sequence[str] | None) -> tuple[str, ...]:
    if split is not None and split not in SPLITS:
        raise GraphirError(f"--split must be layer or graph (or auto), got {split!r}")
    names = [p.strip() for p in (passes or "").split(",") if p.strip()]
    return tuple(([f"place_{split}"] if split else []) + names + list(user or []))


def load(model: str, phase: str = "pp", quant: str | None = None, kv_type: str = "f16"
         ) -> tuple[ModelConfig, BuildOptions, Graph]:
    if phase not in ("pp", "tg"):
        raise GraphirError(f"--phase must be pp or tg, got {phase!r}")
    src = load_source(model)
    opts = BuildOptions(phase=phase, quant=source_quant(src, quant), kv_type=kv_type)  # type: ignore[arg-type]
    return src.cfg, opts, build(src.cfg, opts)


def make_context(model_cfg: ModelConfig, devices: str, ts: str | None, max_gpu: int | None, recurrent: str,
                 reduce_dtype: str | None, mem: str | None, ctx_len: int, ubatch: int) -> PassContext:
    devs = parse_devices(devices)
    ratios = parse_ts(ts, len(devs)) if ts else None
    caps = parse_mem(mem, len(devs)) if mem else None
    if ctx_len < 1 or ubatch < 1:
        raise GraphirError(f"--ctx and --ubatch must be positive, got {ctx_len} and {ubatch}")
    return PassContext(cfg=model_cfg, devices=devs, ts=ratios, max_gpu=max_gpu, recurrent=recurrent,
                       reduce_dtype=reduce_dtype, mem=caps, ctx_len=ctx_len, ubatch=ubatch)


def place(model: str, *, split: str | None = "graph", devices: str = "2", ts: str | None = None,
          max_gpu: int | None = None, recurrent: str = "single", reduce_dtype: str | None = None,
          passes: str | None = None, user_passes: Sequence[str] | None = None, phase: str = "pp",
          quant: str | None = None, kv_type: str = "f16", mem: str | None = None, ctx_len: int = 4096,
          ubatch: int = 512, dump_dir: str | None = None, require_placed: bool = True,
          auto: AutoOptions | None = None, allow_overflow: bool = False
          ) -> tuple[PassContext, BuildOptions, PipelineResult]:
    """The `place` verb as a function: build MODEL, run the pipeline, check memory (`--mem`:
    an error unless `allow_overflow`, then a warning on stderr). Under `--split auto` the
    search runs first; its plan is in the context's options (`auto_plan`)."""
    cfg, opts, g = load(model, phase, quant, kv_type)
    pctx = make_context(cfg, devices, ts, max_gpu, recurrent, reduce_dtype, mem, ctx_len, ubatch)
    pipeline: tuple = build_pipeline(split, passes, user_passes)
    if split == "auto":
        plan = auto_plan(g, pctx, auto or AutoOptions())
        pctx = replace(pctx, options=pctx.options + (("auto_plan", plan),))
        pipeline = (plan.placer((auto or AutoOptions()).at_depth),) + pipeline[1:]
    if pctx.mem is not None and not allow_overflow:
        pipeline += ("check_memory",)
    res = run_pipeline(g, pipeline, pctx, dump_dir=dump_dir)
    if pctx.mem is not None and allow_overflow:
        plan = plan_memory(res.graph, pctx.ctx_len, pctx.ubatch)
        problem = fit_problem({d.device: d.total for d in plan.devices}, dict(zip(pctx.devices, pctx.mem)),
                              f"ctx {pctx.ctx_len}")
        if problem:
            typer.echo(f"warning: {problem}", err=True)
    if require_placed and not res.graph.placed:
        left = sum(1 for n in res.graph.nodes if not n.device)
        raise GraphirError(f"the pipeline left {left} node(s) without a device: give --split layer|graph "
                           f"or a placement pass (--pass module:function)")
    return pctx, opts, res


@dataclass(frozen=True)
class AutoOptions:
    """What `--split auto` minimises for: the system and engine to predict with, the decode
    run per row, the depths (default: sweep-bench rows up to --ctx), PP:TG weights."""

    hw: str = "2x3090"
    engine: str = "ik_llama.cpp"
    tg: int = 128
    depths: str | None = None  # comma separated N_KV values
    weights: str = "1,1"  # PP,TG
    at_depth: int = 0  # the plan's placement at this depth is the one written


def auto_plan(g: Graph, pctx: PassContext, ao: AutoOptions) -> AutoPlan:
    try:
        depths = tuple(int(x) for x in ao.depths.split(",") if x.strip()) if ao.depths else ()
        w_pp, w_tg = (float(x) for x in ao.weights.split(","))
    except ValueError:
        raise GraphirError(f"--depths wants N_KV values like 0,32768 and --weights PP,TG like 1,1; got "
                           f"{ao.depths!r} and {ao.weights!r}") from None
    wl = AutoWorkload(pctx.ubatch, ao.tg, pctx.ctx_len, depths, w_pp, w_tg)
    return place_auto(g, pctx.require_cfg("place_auto"), pctx.devices, wl, ao.hw, ao.engine, ts=pctx.ts).plan


def summary(g: Graph, res: PipelineResult, pctx: PassContext, weights: str = "") -> str:
    counts = count_nodes(g)
    mem = plan_memory(g, pctx.ctx_len, pctx.ubatch)
    caps = dict(zip(pctx.devices, pctx.mem or ()))
    lines = [f"placed {g.info.get('model', '')} phase={g.info.get('phase')} split={g.info.get('split', '-')} "
             f"devices={g.info.get('devices', '-')}",
             f"  {weights or 'weights ' + str(g.info.get('quant', '?'))}, KV {g.info.get('kv_type', '?')}",
             f"  nodes {counts.total}  copies {len(g.by_op(Op.COPY))}  all_reduces {len(g.by_op(Op.ALL_REDUCE))}"]
    lines += [f"  {d:<8} nodes {k:>6}" for d, k in counts.per_device]
    lines += [f"  memory at ctx {pctx.ctx_len}: {describe(m)}"
              + (f" of {caps[m.device] / GIB:.2f} GiB" if m.device in caps else "") for m in mem.devices]
    lines += [f"  pass {r.name:<16} {1e3 * r.seconds:8.1f} ms  verify {1e3 * r.verify_seconds:6.1f} ms  "
              f"nodes {r.nodes_before} -> {r.nodes_after}" for r in res.reports]
    plan = pctx.option("auto_plan")
    if plan is not None:
        lines += ["", plan.explain().rstrip()]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    if any(c.name == "place" for c in app.registered_commands):
        return  # main() registers on every call; once is enough

    @app.command("place")
    def place_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                  split: Optional[str] = typer.Option(None, "--split", "-sm", help="layer | graph | auto "
                                                      "(default layer; with --pass: the passes place)"),
                  devices: str = typer.Option("2", "--devices", help="N | cpu,cpu | cuda:0,cuda:1"),
                  ts: Optional[str] = typer.Option(None, "--ts", "-ts", help="split ratios, e.g. 3,1"),
                  max_gpu: Optional[int] = typer.Option(None, "--max-gpu", help="graph split: devices per layer"),
                  recurrent: str = typer.Option("single", "--recurrent", help="delta-net layers: single | split"),
                  reduce_dtype: Optional[str] = typer.Option(None, "--reduce-dtype", help="f16 | bf16 | f32"),
                  user_pass: Optional[List[str]] = typer.Option(None, "--pass", help="module:function (repeatable)"),
                  passes: Optional[str] = typer.Option(None, "--passes", help="merge_qkv,merge_up_gate,..."),
                  phase: str = typer.Option("pp", "--phase", help="pp | tg"),
                  quant: Optional[str] = typer.Option(None, "--quant", help="IQ4_XS, Q4_K_M, q8_0, ..., FILE.gguf"),
                  kv_type: str = typer.Option("f16", "--kv-type"),
                  format: str = typer.Option("summary", "--format", help="text | json | summary"),
                  mem: Optional[str] = typer.Option(None, "--mem", help="24GiB,24GiB or a preset like 2x3090"),
                  ctx: int = typer.Option(4096, "--ctx", "-c", help="context length for the KV cache"),
                  ubatch: int = typer.Option(512, "--ubatch", "-ub", help="tokens per batch for the compute buffer"),
                  dump: Optional[str] = typer.Option(None, "--dump", help="folder for a text dump after each pass"),
                  hw: str = typer.Option("2x3090", "--hw", help="auto: system to predict on (2x3090, 2xH200, ...)"),
                  engine: str = typer.Option("ik_llama.cpp", "--engine", help="auto: engine profile"),
                  tg: int = typer.Option(128, "--tg", help="auto: tokens decoded per depth"),
                  depths: Optional[str] = typer.Option(None, "--depths",
                                                       help="auto: N_KV list (default 0, ub, .. < ctx)"),
                  weights: str = typer.Option("1,1", "--weights", help="auto: weight of PP and of TG time, e.g. 1,3"),
                  at_depth: int = typer.Option(0, "--at-depth", help="auto: write the plan's placement at this N_KV"),
                  allow_overflow: bool = typer.Option(False, "--allow-overflow", help="--mem: a placement that "
                                                      "does not fit is a warning, not an error"),
                  out: Optional[str] = typer.Option(None, "-o", "--out", callback=output_path)) -> None:
        """Place MODEL on devices (layer, graph or auto split, or user passes) and print or write it."""
        if format not in ("text", "json", "summary"):
            raise GraphirError(f"--format must be text, json or summary, got {format!r}")
        auto = AutoOptions(hw, engine, tg, depths, weights, at_depth)
        pctx, _, res = place(model, split=default_split(split, user_pass, "layer"), devices=devices, ts=ts, max_gpu=max_gpu, recurrent=recurrent,
                             reduce_dtype=reduce_dtype, passes=passes, user_passes=user_pass, phase=phase,
                             quant=quant, kv_type=kv_type, mem=mem, ctx_len=ctx, ubatch=ubatch, dump_dir=dump,
                             auto=auto, allow_overflow=allow_overflow)
        g = res.graph
        label = weights_label(load_source(model), quant)
        body = {"text": to_text, "json": lambda x: to_json(x, indent=1),
                "summary": lambda x: summary(x, res, pctx, label)}[format](g)
        emit(body, out)

    @app.command("nodes")
    def nodes_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                  phase: str = typer.Option("pp", "--phase", help="pp | tg"),
                  ubatch: int = typer.Option(512, "--ubatch", "-ub", help="tokens per batch (for the heuristic)"),
                  split: Optional[str] = typer.Option(None, "--split", "-sm", help="layer | graph"),
                  devices: str = typer.Option("1", "--devices", help="N | cpu,cpu | cuda:0,cuda:1"),
                  ts: Optional[str] = typer.Option(None, "--ts", "-ts"),
                  max_gpu: Optional[int] = typer.Option(None, "--max-gpu"),
                  recurrent: str = typer.Option("single", "--recurrent"),
                  passes: Optional[str] = typer.Option(None, "--passes", help="merge_qkv,merge_up_gate"),
                  quant: Optional[str] = typer.Option(None, "--quant"),
                  format: str = typer.Option("json", "--format", help="json | table"),
                  out: Optional[str] = typer.Option(None, "-o", "--out", callback=output_path)) -> None:
        """Node count: the closed-form estimate, the built graph's count, llama.cpp's budget."""
        if format not in ("json", "table"):
            raise GraphirError(f"--format must be json or table, got {format!r}")
        if split == "auto":
            raise GraphirError("nodes: --split auto has no closed-form estimate; place it (graphir place "
                               "--split auto) and count, or estimate layer or graph")
        pctx, opts, res = place(model, split=split, devices=devices, ts=ts, max_gpu=max_gpu, recurrent=recurrent,
                                passes=passes, phase=phase, quant=quant, ubatch=ubatch, require_placed=False)
        est = estimate_nodes(opts_cfg(pctx), opts, merges=build_pipeline(None, passes, None), split=split,
                             devices=pctx.devices, ts=pctx.ts, max_gpu=max_gpu,
                             recurrent=recurrent, ubatch=ubatch)  # type: ignore[arg-type]
        actual = count_nodes(res.graph)
        doc = {"model": opts_cfg(pctx).name or model, "phase": phase, "split": split,
               "devices": list(pctx.devices) if split else [], "estimate": est.budget, "exact": est.exact,
               "actual": actual.total, "per_device": dict(actual.per_device),
               "estimate_per_device": dict(est.per_device),
               "heuristic": est.heuristic, "n_tensors": est.n_tensors, "ubatch": ubatch}
        if format == "json":
            emit(json.dumps(doc, indent=1), out)
        else:
            emit("\n".join(f"{k:<20} {v}" for k, v in doc.items()), out)

    @app.command("passes")
    def passes_cmd(format: str = typer.Option("table", "--format", help="table | json")) -> None:
        """List the registered passes."""
        if format not in ("table", "json"):
            raise GraphirError(f"--format must be table or json, got {format!r}")
        rows = registered()
        if format == "json":
            typer.echo(json.dumps([{"name": p.name, "doc": p.doc} for p in rows], indent=1))
        else:
            for p in rows:
                typer.echo(f"{p.name:<18} {p.doc}")


def opts_cfg(pctx: PassContext) -> ModelConfig:
    return pctx.require_cfg("nodes")


__all__ = ["AutoOptions", "auto_plan", "build_pipeline", "load", "make_context", "place", "register", "summary"]
