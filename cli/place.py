"""The placement verbs: `place`, `nodes`, `passes`.

Pipeline of `place` / `nodes`: the `--split` placement first (if any), then `--passes` and
`--pass` entries in the order given (merges commute with placement, and running them after it
merges each device's slices), then the memory check when `--mem` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import typer

from cli import options as O
from cli.common import default_split, emit, output_path
from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from graphir.models.sources import load_source, weight_scheme, weights_label
from graphir.ops import Op
from graphir.serialize import to_json
from graphir.text import to_text

from passes.count import count_nodes, estimate_nodes
from passes.devices import parse_devices
from passes.manager import PassContext, PipelineResult, registered, run_pipeline
from passes.memory import GIB, describe, fit_problem, parse_mem, plan_memory
from planner.workload import DEFAULT_ENGINE, DEFAULT_HW, Workload


def pass_names(passes: str | None, user: Sequence[str] | None = None) -> tuple[str, ...]:
    """`--passes a,b` then `--pass m:f ...`, in the order given."""
    return tuple([p.strip() for p in (passes or "").split(",") if p.strip()] + list(user or []))


def load(model: str, phase: str = "pp", quant: str | None = None, kv_type: str = "f16"
         ) -> tuple[ModelConfig, BuildOptions, Graph]:
    if phase not in ("pp", "tg"):
        raise GraphirError(f"--phase must be pp or tg, got {phase!r}")
    src = load_source(model)
    opts = BuildOptions(phase=phase, quant=weight_scheme(src, quant), kv_type=kv_type)  # type: ignore[arg-type]
    return src.cfg, opts, build(src.cfg, opts)


def place(model: str, *, split: str | None = "graph", devices: str = "2", ts: str | None = None,
          max_gpu: int | None = None, recurrent: str = "single", reduce_dtype: str | None = None,
          passes: str | None = None, user_passes: Sequence[str] | None = None, phase: str = "pp",
          quant: str | None = None, kv_type: str = "f16", mem: str | None = None, ctx_len: int = 4096,
          ubatch: int = 512, dump_dir: str | None = None, require_placed: bool = True,
          auto: AutoOptions | None = None, allow_overflow: bool = False
          ) -> tuple[PassContext, BuildOptions, PipelineResult]:
    """The `place` verb as a function: build MODEL, run the pipeline, check memory (`--mem`:
    an error unless `allow_overflow`, then a warning on stderr). Under `--split auto` the
    search runs on the first graph placed; its plan is in the context's options (`auto_plan`)."""
    from planner.placement import parse_placement, pipeline, searched_plan  # the search imports the cost model

    cfg, opts, g = load(model, phase, quant, kv_type)
    if ctx_len < 1 or ubatch < 1:
        raise GraphirError(f"--ctx and --ubatch must be positive, got {ctx_len} and {ubatch}")
    devs = parse_devices(devices)
    ao = auto or AutoOptions()
    po = parse_placement(split, devs, ts, max_gpu, recurrent, passes=pass_names(passes, user_passes), hw=ao.hw,
                         engine=ao.engine, workload=ao.workload(ubatch, ctx_len) if split == "auto" else None)
    pctx = po.context(cfg, reduce_dtype=reduce_dtype, mem=parse_mem(mem, len(devs)) if mem else None,
                      ctx_len=ctx_len, ubatch=ubatch)
    steps = pipeline(po, cfg, ao.at_depth)
    if pctx.mem is not None and not allow_overflow:
        steps += ("check_memory",)
    res = run_pipeline(g, steps, pctx, dump_dir=dump_dir)
    plan = searched_plan(steps)
    if plan is not None:
        pctx = replace(pctx, options=pctx.options + (("auto_plan", plan),))
    if pctx.mem is not None and allow_overflow:
        mplan = plan_memory(res.graph, pctx.ctx_len, pctx.ubatch)
        problem = fit_problem({d.device: d.total for d in mplan.devices}, dict(zip(pctx.devices, pctx.mem)),
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

    hw: str = DEFAULT_HW
    engine: str = DEFAULT_ENGINE
    tg: int = Workload.tg
    depths: str | None = None  # comma separated N_KV values
    weights: str = "1,1"  # PP,TG
    at_depth: int = 0  # the plan's placement at this depth is the one written

    def workload(self, ubatch: int, ctx: int) -> Workload:
        """The workload the search minimises: `place`'s own u-batch and context."""
        try:
            depths = tuple(int(x) for x in self.depths.split(",") if x.strip()) if self.depths else ()
            w_pp, w_tg = (float(x) for x in self.weights.split(","))
        except ValueError:
            raise GraphirError(f"--depths wants N_KV values like 0,32768 and --weights PP,TG like 1,1; got "
                               f"{self.depths!r} and {self.weights!r}") from None
        return Workload(ubatch, self.tg, ctx, depths, w_pp, w_tg)


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
        from planner.auto_report import explain

        lines += ["", explain(plan).rstrip()]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    if any(c.name == "place" for c in app.registered_commands):
        return  # main() registers on every call; once is enough

    @app.command("place")
    def place_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                  split: O.Split = None, devices: O.Devices = "2", ts: O.Ts = None, max_gpu: O.MaxGpu = None,
                  recurrent: O.Recurrent = "single",
                  reduce_dtype: Optional[str] = typer.Option(None, "--reduce-dtype", help="f16 | bf16 | f32"),
                  user_pass: O.UserPass = None, passes: O.Passes = None,
                  phase: O.Phase = "pp",
                  quant: O.Quant = None,
                  kv_type: O.KvType = "f16",
                  format: str = typer.Option("summary", "--format", help="text | json | summary"),
                  mem: Optional[str] = typer.Option(None, "--mem", help="24GiB,24GiB or a preset like 2x3090"),
                  ctx: int = typer.Option(4096, "--ctx", "-c", help="context length for the KV cache"),
                  ubatch: int = typer.Option(512, "--ubatch", "-ub", help="tokens per batch for the compute buffer"),
                  dump: Optional[str] = typer.Option(None, "--dump", help="folder for a text dump after each pass"),
                  hw: O.Hw = O.HW_DEFAULT, engine: O.Engine = O.ENGINE_DEFAULT,
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
                  phase: O.Phase = "pp",
                  ubatch: int = typer.Option(512, "--ubatch", "-ub", help="tokens per batch (for the heuristic)"),
                  split: O.Split = None, devices: O.Devices = "1", ts: O.Ts = None, max_gpu: O.MaxGpu = None,
                  recurrent: O.Recurrent = "single", passes: O.Passes = None,
                  quant: O.Quant = None,
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
        est = estimate_nodes(opts_cfg(pctx), opts, merges=pass_names(passes), split=split,
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


__all__ = ["AutoOptions", "load", "pass_names", "place", "register", "summary"]
