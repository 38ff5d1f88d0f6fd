"""`graphir eval` and `graphir run`: execute a (placed) model; measure it like llama-sweep-bench.

torch is imported only when a verb runs, so other verbs never pay for it.
"""

from __future__ import annotations

import io
import sys
import time
from typing import Any, Callable, Optional

import typer

from backends.cuda.rules.pipeline import ENGINE_PASSES
from cli import options as O
from cli.common import output_path
from graphir.errors import GraphirError

RANDOM_HELP = ("run on seeded random weights (a checkpoint directory without readable weights is "
               "an error otherwise; a preset or config.json has none and always runs random)")
OVERFLOW_HELP = "go on when the estimate says the host's or GPUs' memory is too small (a warning)"
KV_HELP = ("KV cache type: the compute type (default), f32, f16, bf16, or ggml's q8_0 / q4_0 blocks "
           "(attention reads them dequantised)")
DEFAULT_PASSES = ",".join(ENGINE_PASSES)  # the engine pipeline (backends/cuda/rules/pipeline.py)


def parse_tokens(spec: str) -> list[int]:
    try:
        ids = [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise GraphirError(f"--tokens must be comma-separated integers, got {spec!r}") from None
    if not ids:
        raise GraphirError("--tokens is empty")
    return ids


def make_transform(cfg: Any, devices: tuple[str, ...], split: str | None = None, ts: str | None = None,
                   max_gpu: int | None = None, recurrent: str = "single", passes: str | None = None,
                   ctx: int = 4096, *, ubatch: int = 2048, tg: int = 128, hw: str = O.HW_DEFAULT,
                   engine: str = O.ENGINE_DEFAULT) -> list[Callable[..., Any]]:
    """Placement (`split` over `devices`) first, then the named passes (registered names or
    module:function), as `graphir place` orders them. Under `--split auto` the search runs on
    the first graph placed, for this sweep's shape on `hw` with `engine`."""
    from planner.placement import parse_placement, placer
    from planner.workload import Workload

    names = tuple(p.strip() for p in (passes or "").split(",") if p.strip() and p.strip() != "none")
    po = parse_placement(split, devices, ts, max_gpu, recurrent, passes=names, hw=hw, engine=engine,
                         workload=Workload(ubatch=ubatch, tg=tg, ctx=ctx) if split == "auto" else None)
    if len(devices) > 1 and split is None:
        raise GraphirError(f"{len(devices)} devices given: running on several needs a split mode (--split layer|graph|auto)")
    return placer(po, cfg, po.context(cfg, ctx_len=ctx, ubatch=ubatch))


def header(source: Any, random_weights: bool, seed: int, dtype: str, plan: Any, devices: tuple[str, ...],
           notes: tuple[str, ...] = (), kv_type: str | None = None) -> dict[str, Any]:
    """What an execution states before its results: the weights (random or the source's own
    types, computed in `dtype`), the KV type and the memory per device (GiB, as estimated;
    CPU devices share the host's memory: one figure)."""
    from backends.cuda.runtime.memcheck import gib_per_device
    from graphir.models.sources import uses_random_weights, weights_label

    what = (f"random weights (seed {seed})" if uses_random_weights(source, random_weights)
            else f"{weights_label(source)}, computed in {dtype}")
    cpu = all(d.startswith("cpu") for d in devices)
    return {"weights": what, "kv_type": kv_type or dtype, "memory_GiB": dict(gib_per_device(plan, "host" if cpu else devices[0])),
            "notes": list(notes)}


HEADER_KEYS = ("weights", "kv_type", "memory_GiB", "notes")


KEEP_HELP = ("keep GGUF matmul weights of types Q8_0, Q4_0, Q4_K in their blocks (decode runs the quant GEMV, "
             "prefill dequantises per call); other tensors load as usual")


def kept_note(kept: dict[str, int]) -> str:
    """The header's note on weights kept in their blocks (Session.kept); the memory figures
    above count every weight at the compute type, so kept ones take less than they say."""
    types = ", ".join(f"{q} {n}" for q, n in kept.items())
    return (f"kept in GGUF blocks: {sum(kept.values())} matmul weights ({types or 'none'}); "
            "the memory estimate counts them at the compute type")


def header_line(h: dict[str, Any]) -> str:
    mem = ", ".join(f"{d} {g:.3g}" for d, g in h["memory_GiB"].items())
    return "; ".join([f"{h['weights']}, KV {h['kv_type']}", f"memory per device (GiB): {mem}"]
                     + [f"note: {n}" for n in h["notes"]])


def _prepare(model: str, devices: str, dtype: str, ctx: int, tokens: int, random_weights: bool,
             allow_overflow: bool, layers: str | None = None, pp_logits: str = "all",
             kv_type: str | None = None) -> tuple[Any, Any, Any, Any]:
    """Before torch loads: the source, its weights (never silently random) and, on CPU devices,
    host memory for the session (the unplaced graph: placement moves bytes between logical
    CPU devices, never out of the host). Returns (source, device names, layer range, plan or
    None for GPUs)."""
    from backends.cuda.runtime.memcheck import check_host, session_plan
    from cli.common import parse_layers
    from graphir.models.sources import load_source, require_weights
    from passes.devices import parse_devices as placement_devices

    names = placement_devices(devices)
    source = load_source(model)
    require_weights(source, random_weights)
    rng = parse_layers(layers, source.cfg.n_layer)
    plan = None
    if all(d.startswith("cpu") for d in names):
        plan = session_plan(source.cfg, dtype, ctx, tokens, rng, pp_logits=pp_logits, kv_type=kv_type)
        _warn(check_host(plan, dtype, allow_overflow))
    return source, names, rng, plan


def check_kv(kv_type: str | None) -> None:
    """--kv-type before anything loads: a type the executor holds (f32, f16, bf16, q8_0, q4_0)."""
    if kv_type is not None:
        from backends.cuda.reference.kv_quant import check_kv_type
        from backends.cuda.runtime.session import FLOAT_KV

        check_kv_type(kv_type, FLOAT_KV)


def _warn(problem: str | None) -> None:
    if problem:
        typer.echo(f"warning: {problem}", err=True)


def _session_plan(source: Any, devs: tuple[str, ...], dtype: str, ctx: int, tokens: int, rng: Any,
                  transform: list[Callable[..., Any]], allow_overflow: bool, pp_logits: str = "all",
                  kv_type: str | None = None) -> Any:
    """The placed session's memory per device; GPUs checked against their free memory."""
    from backends.cuda.runtime.memcheck import check_gpus, session_plan

    plan = session_plan(source.cfg, dtype, ctx, tokens, rng, transform, pp_logits, kv_type)
    _warn(check_gpus(plan, devs, dtype, allow_overflow))
    return plan


def evaluate(model: str, tokens: list[int], decode: int = 0, dtype: str = "f32", devices: str = "cpu",
             seed: int = 0, ctx: int | None = None, out: str | None = None, split: str | None = None,
             ts: str | None = None, max_gpu: int | None = None, recurrent: str = "single",
             passes: str | None = None, *, random_weights: bool = False, allow_overflow: bool = False,
             kv_type: str | None = None, keep_quant: bool = False,
             say: Callable[[str], None] | None = None) -> list[int]:
    """The `eval` verb as a function: returns the generated ids; writes logits [P+N, vocab]
    float32 to `out` (.npy, atomically) when given; `say` gets the header line. A checkpoint
    directory without readable weights is an error unless `random_weights`; a session that
    does not fit the host's or GPUs' memory is one unless `allow_overflow`."""
    if decode < 0:
        raise GraphirError(f"--decode must be >= 0, got {decode}")
    if dtype not in ("f32", "bf16", "f16"):
        raise GraphirError(f"--dtype must be f32, bf16 or f16, got {dtype!r}")
    need = len(tokens) + decode
    if ctx is not None and ctx < need:
        raise GraphirError(f"--ctx {ctx} is shorter than the {len(tokens)} prompt + {decode} decoded tokens")
    check_kv(kv_type)
    source, names, _, plan = _prepare(model, devices, dtype, ctx or need, len(tokens), random_weights,
                                      allow_overflow, kv_type=kv_type)

    import numpy as np

    from backends.cuda.runtime.devices import parse_devices
    from backends.cuda.runtime.session import Session, greedy
    from backends.cuda.weights.sources import random_source
    from cli.common import write_atomic
    from graphir.models.sources import uses_random_weights

    devs = parse_devices(names)
    transform = make_transform(source.cfg, devs, split, ts, max_gpu, recurrent, passes, ctx or need)
    plan = plan or _session_plan(source, devs, dtype, ctx or need, len(tokens), None, transform, allow_overflow,
                                 kv_type=kv_type)
    head = header(source, random_weights, seed, dtype, plan, devs, kv_type=kv_type)
    on_gpu = any(d.startswith("cuda") for d in devs)
    weights = random_source(seed, on_gpu) if uses_random_weights(source, random_weights) else None
    session = Session(source, weights, devs, ctx or need, dtype=dtype, seed=seed, transform=transform,
                      kv_type=kv_type, keep_quant=keep_quant)
    if keep_quant:
        head["notes"].append(kept_note(session.kept))
    logits, generated = greedy(session, tokens, decode)
    if out:
        buf = io.BytesIO()
        np.save(buf, logits.numpy().astype(np.float32))
        write_atomic(out, buf.getvalue())
    (say or (lambda msg: None))(header_line(head))  # after success: an error stays the only line on stderr
    return generated


def _progress() -> Callable[[str], None]:
    """Lines on stderr while it runs, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return lambda msg: None
    return lambda msg: (sys.stderr.write(f"\r\033[K{msg}"), sys.stderr.flush())  # type: ignore[func-returns-value]


def run_sweep(model: str, *, devices: str = "cuda:0", split: str | None = None, ts: str | None = None,
              recurrent: str = "single", max_gpu: int | None = None, dtype: str = "bf16", ubatch: int = 2048,
              tg: int = 128, ctx: int = 8192, layers: str | None = None, passes: str | None = DEFAULT_PASSES,
              seed: int = 0, graphs: bool = True, say: Callable[[str], None] | None = None,
              hw: str = "2xH200", engine: str = "graphir-cuda", random_weights: bool = False,
              allow_overflow: bool = False, kv_type: str | None = None, keep_quant: bool = False) -> dict[str, Any]:
    """The `run` verb as a function: {"rows": [SweepRow], "meta": {...}}; meta carries the
    header (weights, KV type, memory per device). Weights and memory are checked as `evaluate`
    checks them; a u-batch above --ctx is clamped to it (reports.sweep.sweep_shape)."""
    from reports.sweep import sweep_shape

    say = say or (lambda msg: None)
    if dtype not in ("f32", "bf16", "f16"):
        raise GraphirError(f"--dtype must be f32, bf16 or f16, got {dtype!r}")
    check_kv(kv_type)
    ubatch, notes = sweep_shape(ubatch, tg, ctx)
    n_ctx = ctx + max(ubatch, tg)
    source, names, rng, plan = _prepare(model, devices, dtype, n_ctx, ubatch, random_weights, allow_overflow,
                                        layers, "last", kv_type)

    from backends.cuda.runtime.devices import parse_devices
    from backends.cuda.runtime.session import Session
    from backends.cuda.runtime.sweeprun import calibrate, sweep
    from backends.cuda.weights.sources import random_source
    from graphir.models.sources import uses_random_weights

    devs = parse_devices(names)
    transform = make_transform(source.cfg, devs, split, ts, max_gpu, recurrent, passes, ctx, ubatch=ubatch, tg=tg,
                               hw=hw, engine=engine)
    plan = plan or _session_plan(source, devs, dtype, n_ctx, ubatch, rng, transform, allow_overflow, "last", kv_type)
    head = header(source, random_weights, seed, dtype, plan, devs, notes, kv_type)
    say(f"building {source.cfg.name or model} on {','.join(devs)} ({split or 'one device'})")
    t0 = time.perf_counter()
    weights = random_source(seed, any(d.startswith("cuda") for d in devs)) \
        if uses_random_weights(source, random_weights) else None
    session = Session(source, weights, devs, n_ctx, dtype=dtype, seed=seed, transform=transform,
                      layers=rng, pp_logits="last", kv_type=kv_type, keep_quant=keep_quant)
    if keep_quant:
        head["notes"].append(kept_note(session.kept))
    load_s = time.perf_counter() - t0
    cal = calibrate(session, ubatch)
    label = split or "single"
    if split == "graph" and any(source.cfg.is_recurrent(i) for i in range(source.cfg.n_layer)):
        label = f"graph-{recurrent}"  # how delta-net layers were placed
    rows = sweep(session, ubatch=ubatch, tg=tg, ctx=ctx, split=label, graphs=graphs, seed=seed,
                 progress=lambda r: say(f"N_KV {r.n_kv:>6}: S_PP {r.s_pp_tps:10.2f} t/s  S_TG {r.s_tg_tps:8.2f} t/s"))
    from planner.auto_report import explain
    from planner.placement import searched_plan

    meta = {"model": source.cfg.name or model, **head, "devices": list(devs), "split": label, "dtype": dtype,
            "ubatch": ubatch, "tg": tg, "ctx": ctx, "layers": layers or "all", "passes": passes or "none",
            "cuda_graphs": graphs, "load_s": round(load_s, 3), "delta_net_prefill_ms": cal,
            "nodes": {k: len(g.nodes) for k, g in session.executed.items()}, "fast_paths": session.choices.diagnostics()}
    if keep_quant:
        meta["kept_quant"] = dict(session.kept)
    plan = searched_plan(transform)
    if plan is not None:
        meta["auto_plan"] = explain(plan)
    return {"rows": rows, "meta": meta, "session": session}


def register(app: typer.Typer) -> None:
    if any(c.name == "eval" for c in app.registered_commands):
        return

    @app.command("eval")
    def eval_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                 tokens: str = typer.Option(..., "--tokens", help="prompt token ids, e.g. 3,1,4"),
                 decode: int = typer.Option(0, "--decode", help="greedy decode steps after the prompt"),
                 dtype: str = typer.Option("f32", "--dtype", help="f32, bf16 or f16"),
                 devices: O.Devices = "cpu", split: O.Split = None, ts: O.Ts = None, max_gpu: O.MaxGpu = None,
                 recurrent: O.Recurrent = "single", passes: O.Passes = None,
                 seed: int = typer.Option(0, "--seed", help="seed of random weights (when MODEL has none)"),
                 ctx: Optional[int] = typer.Option(None, "--ctx", "-c", help="context to preallocate (default: just enough)"),
                 out: Optional[str] = typer.Option(None, "--out", help="write logits [P+N, vocab] float32 .npy",
                                                   callback=output_path),
                 random_weights: bool = typer.Option(False, "--random-weights", help=RANDOM_HELP),
                 allow_overflow: bool = typer.Option(False, "--allow-overflow", help=OVERFLOW_HELP),
                 kv_type: Optional[str] = typer.Option(None, "--kv-type", help=KV_HELP),
                 keep_quant: bool = typer.Option(False, "--keep-quant", help=KEEP_HELP)) -> None:
        """Run MODEL on a prompt, then greedy decode steps; print the generated ids (the header,
        with weights, KV type and memory, goes to stderr)."""
        generated = evaluate(model, parse_tokens(tokens), decode, dtype, devices, seed, ctx, out, split, ts,
                             max_gpu, recurrent, passes, random_weights=random_weights,
                             allow_overflow=allow_overflow, kv_type=kv_type, keep_quant=keep_quant,
                             say=lambda msg: typer.echo(f"# {msg}", err=True))
        typer.echo(",".join(str(t) for t in generated))

    @app.command("run")
    def run_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                devices: O.Devices = "cuda:0", split: O.Split = None, ts: O.Ts = None,
                recurrent: O.Recurrent = "single", max_gpu: O.MaxGpu = None, hw: O.Hw = O.HW_DEFAULT,
                engine: O.Engine = O.ENGINE_DEFAULT,
                dtype: str = typer.Option("bf16", "--dtype", help="bf16, f16 or f32"),
                ubatch: int = typer.Option(2048, "--ubatch", "-ub", help="PP tokens per row (the u-batch)"),
                tg: int = typer.Option(128, "--tg", help="decoded tokens per row"),
                ctx: int = typer.Option(8192, "--ctx", "-c", help="rows for N_KV = 0, ub, ... below this"),
                layers: Optional[str] = typer.Option(None, "--layers", help="keep layers A:B (plus embedding, head)"),
                passes: O.Passes = DEFAULT_PASSES,
                seed: int = typer.Option(0, "--seed", help="seed of random weights (when MODEL has none)"),
                no_graphs: bool = typer.Option(False, "--no-cuda-graphs", help="decode eagerly, no CUDA graphs"),
                format: str = typer.Option("table", "--format", help="table | csv | json"),
                out: Optional[str] = typer.Option(None, "-o", "--out", help="write the table here",
                                                  callback=output_path),
                random_weights: bool = typer.Option(False, "--random-weights", help=RANDOM_HELP),
                allow_overflow: bool = typer.Option(False, "--allow-overflow", help=OVERFLOW_HELP),
                kv_type: Optional[str] = typer.Option(None, "--kv-type", help=KV_HELP),
                keep_quant: bool = typer.Option(False, "--keep-quant", help=KEEP_HELP)) -> None:
        """Measure MODEL like llama-sweep-bench: S_PP and S_TG at each cache depth."""
        from cli.common import emit
        from reports.sweep import format_markdown, to_json, write_csv

        if format not in ("table", "csv", "json"):
            raise GraphirError(f"--format must be table, csv or json, got {format!r}")
        show = _progress()
        res = run_sweep(model, devices=devices, split=split, ts=ts, recurrent=recurrent, max_gpu=max_gpu,
                        dtype=dtype, ubatch=ubatch, tg=tg, ctx=ctx, layers=layers, passes=passes, seed=seed,
                        graphs=not no_graphs, say=show, hw=hw, engine=engine, random_weights=random_weights,
                        allow_overflow=allow_overflow, kv_type=kv_type, keep_quant=keep_quant)
        show("")
        rows, meta = res["rows"], res["meta"]
        if format == "csv":
            buf = io.StringIO()
            rest = " ".join(f"{k}={v}" for k, v in meta.items() if k not in ("nodes", *HEADER_KEYS))
            write_csv(rows, buf, comment=f"{meta['model']}: {header_line(meta)}\n{rest}")
            text = buf.getvalue()
        elif format == "json":
            text = to_json(rows, **{"meta": meta})
        else:
            text = f"# {meta['model']}: {header_line(meta)}\n\n" + format_markdown(rows)
        emit(text, out)
