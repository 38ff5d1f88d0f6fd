"""Picture verbs: `graphir show` (placed-graph drawings) and `graphir timeline` (a per-GPU Gantt
chart of one predicted prompt-processing step and one decode step).

`show` places the whole model with the same pipeline as `graphir place` and then draws it: the
layer view (`reports.draw.layer_view`) or the op view of a few layers, as SVG, PNG or Graphviz
source, or prints the canonical IR with devices (`--format text`). `timeline` prices the
placed graphs with the cost model and draws the trace of `backends.costmodel.timeline.trace`;
`-o x.csv` / `x.json` writes the trace itself. Backends are imported inside the verbs only.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

from cli import options as O
from cli.common import default_split, emit, output_path, parse_layers
from graphir.fileio import write_output
from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.ops import Op

FORMATS = ("svg", "png", "dot", "text")
# node kinds of the Gantt chart, in legend order, with their colours
KIND_COLORS = {"matmul": "#4C72B0", "MoE": "#55A868", "attention": "#C44E52", "delta-net": "#8172B3",
               "comm": "#E6A700", "other": "#A0A0A0"}
IDLE = "#F1F1F1"
ZOOM_LAYERS = 4  # the PP zoom panel shows this many first layers


def _format(fmt: str | None, out: str | None) -> str:
    f = fmt or (Path(out).suffix.lstrip(".").lower() if out else "") or "dot"
    f = {"gv": "dot", "txt": "text"}.get(f, f)
    if f not in FORMATS:
        raise GraphirError(f"--format must be one of {', '.join(FORMATS)} (or an -o ending in one), got {f!r}")
    if f == "png" and not out:
        raise GraphirError("PNG output needs -o FILE")
    return f


def default_op_layers(g: Graph) -> list[int]:
    """The first layer of each mixer kind (delta-net, attention): what differs between layers."""
    first: dict[str, int] = {}
    for n in g.nodes:
        if n.layer is not None and n.op in (Op.DELTA_NET, Op.ATTENTION):
            first.setdefault(n.op.value, n.layer)
    return sorted(set(first.values())) or [0]


def _text(g: Graph, layers: range | None) -> str:
    from graphir.text import format_node, to_text

    if layers is None:
        return to_text(g)
    lines = [f"# layers {layers.start}:{layers.stop} only: a fragment, not a whole graph"]
    return "\n".join(lines + [format_node(n) for n in g.nodes if n.layer in layers]) + "\n"


def show(model: str, *, split: str | None = None, devices: str = "2", ts: str | None = None,
         max_gpu: int | None = None, recurrent: str = "single", passes: str | None = None,
         user_passes: Sequence[str] | None = None, layers: str | None = None, view: str = "layers",
         phase: str = "pp", quant: str | None = None, kv_type: str = "f16", fmt: str = "dot",
         title: str | None = None) -> str | bytes:
    """The `show` verb as a function: place MODEL (`split` and/or `user_passes`, as `graphir
    place`), then draw it: Graphviz source or IR text as str, SVG/PNG as bytes."""
    from cli.place import place

    from reports import draw

    if view not in ("layers", "ops"):
        raise GraphirError(f"--view must be layers or ops, got {view!r}")
    pctx, _, res = place(model, split=split, devices=devices, ts=ts, max_gpu=max_gpu, recurrent=recurrent,
                         passes=passes, user_passes=user_passes, phase=phase, quant=quant, kv_type=kv_type,
                         require_placed=False)
    g = res.graph
    n_layer = pctx.require_cfg("show").n_layer
    chosen = parse_layers(layers, n_layer)
    if fmt == "text":
        return _text(g, chosen)
    if view == "layers":
        src = draw.layer_view(g, title or "", chosen)
    else:
        picked = list(chosen) if chosen is not None else default_op_layers(g)
        where = f"blk.{picked[0]}" if len(picked) == 1 else "blk." + ",".join(map(str, picked))
        src = draw.op_view(g, picked, title=title or f"{draw.default_title(g)} · {where}")
    return src if fmt == "dot" else draw.render(src, fmt)


# ----------------------------------------------------------------------------- timeline

def op_kind(op: Op) -> str:
    """Colour class of a node in the Gantt chart."""
    if op in (Op.COPY, Op.ALL_REDUCE):
        return "comm"
    if op in (Op.MOE_MATMUL, Op.MOE_TOPK, Op.MOE_TOPK_BIAS, Op.MOE_WEIGHTS, Op.MOE_SUM, Op.MOE_TOPK_BIASED, Op.MOE_WEIGHTS_SIGMOID):
        return "MoE"
    if op in (Op.DELTA_NET, Op.SSM_CONV):
        return "delta-net"
    return {Op.MATMUL: "matmul", Op.HEAD_MATMUL: "matmul", Op.ATTENTION: "attention"}.get(op, "other")


Panel = tuple[str, Sequence[Any], float, list[tuple[float, str]]]  # title, spans, seconds, marks


def gantt(panels: Sequence[Panel], devices: Sequence[str], ops: dict[str, Op], title: str, path: str | Path) -> None:
    """Draw panels (title, spans, seconds shown, [(time, label)] marks): one row per device, a
    bar per node coloured by kind, idle time as the grey background, busy share at the right."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from planner.report import save_figure

    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 1.2 + 1.05 * len(devices) * len(panels)))
    for ax, (name, spans, total, marks) in zip([axes] if len(panels) == 1 else axes, panels):
        ms = 1e3
        for t, label in marks:  # layer starts
            ax.axvline(t * ms, color="black", lw=0.6, ls=":")
            ax.text(t * ms, -0.55, label, fontsize=7, va="bottom")
        for y, dev in enumerate(devices):
            ax.broken_barh([(0, total * ms)], (y - 0.4, 0.8), facecolors=IDLE)
            mine = [s for s in spans if s.device == dev]
            for kind, color in KIND_COLORS.items():
                bars = [(s.start * ms, (s.end - s.start) * ms) for s in mine if op_kind(ops[s.node]) == kind]
                if bars:
                    ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=color, linewidth=0)
            busy = sum(min(s.end, total) - s.start for s in mine)
            ax.text(total * ms * 1.005, y, f"busy {busy / total:.0%}", va="center", fontsize=8)
        ax.set_yticks(range(len(devices)), list(devices))
        ax.set_ylim(len(devices) - 0.5, -0.5)
        ax.set_xlim(0, total * ms * 1.08)
        ax.set_xlabel("milliseconds")
        ax.set_title(name, fontsize=10, loc="left", pad=14 if marks else 6)
    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items()] + [Patch(color=IDLE, label="idle")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.955))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    save_figure(fig, path)


def timeline(model: str, *, hw: str = O.HW_DEFAULT, engine: str = O.ENGINE_DEFAULT, quant: str | None = None,
             kv_type: str = "f16", split: str | None = "graph", ts: str | None = None, max_gpu: int | None = None,
             recurrent: str = "single", gpus: int | None = None, depth: int = 0, ubatch: int = 2048,
             allow_overflow: bool = False, passes: Sequence[str] | None = None
             ) -> tuple[list[Panel], tuple[str, ...], dict[str, Op], str]:
    """Trace one PP step (a u-batch) and one TG step (a token) at depth N_KV = `depth`; panels:
    PP, PP zoomed on the first layers (long models), TG. `passes` run after the split's placement
    (split None: they are the placement). The title's second line states the weight and KV types
    and the memory per GPU; a placement that does not fit the GPUs (cache at depth + u-batch) is
    an error unless `allow_overflow`."""
    from planner.placement import parse_placement, place
    from planner.predict import fit_check, memory_per_device, resolve_quant, select_gpus
    from backends.costmodel.price import price
    from backends.costmodel.profiles import load_engine
    from hardware.profiles import resolve_system
    from backends.costmodel.timeline import trace

    from graphir.models import BuildOptions
    from graphir.models.sources import load_source, weights_label
    from graphir.quant import scheme

    if split == "auto" or (split is None and not passes):
        raise GraphirError(f"timeline: --split must be layer or graph (or --pass places), got {split!r}")
    if depth < 0 or ubatch < 1:
        raise GraphirError(f"--depth must be >= 0 and --ubatch >= 1, got {depth} and {ubatch}")
    sysm, eng = resolve_system(hw), load_engine(engine)
    src = load_source(model)
    q = resolve_quant(src, quant)
    devices = select_gpus(sysm, gpus)
    po = parse_placement(split, devices, ts, max_gpu, recurrent, passes=tuple(passes or ()))
    panels, ops = [], {}
    facts = ""
    for phase in ("pp", "tg"):
        # sweep-bench asks for the last row's logits only, as `predict` prices it
        opts = BuildOptions(phase=phase, quant=scheme(q, default="bf16"), kv_type=kv_type,  # type: ignore[arg-type]
                            logits="last")
        g = place(src.cfg, opts, po)
        if phase == "pp":  # before any tracing: the cache holds depth + this u-batch
            mem = memory_per_device(g, depth + ubatch)
            warning = fit_check(split, g.device_list(), mem, sysm, depth + ubatch, allow_overflow)
            if warning:
                typer.echo(f"warning: {warning}", err=True)
            facts = (f"{weights_label(src, quant)}, KV {kv_type}; memory per GPU at N_KV {depth} + {ubatch}: "
                     + ", ".join(f"{d} {gb * 1e9 / 2**30:.2f}" for d, gb in zip(g.device_list(), mem))
                     + f" GiB of {sysm.gpu.mem_GB * 1e9 / 2**30:.2f}")
        ops.update({n.name: n.op for n in g.nodes})
        spans = trace(price(g, ubatch), sysm, eng, float(depth))
        total = max(s.end for s in spans)
        what = f"PP: one u-batch of {ubatch} tokens" if phase == "pp" else "TG: one token"
        panels.append((f"{what} at N_KV = {depth}: {total * 1e3:.1f} ms on the GPUs "
                       f"(+{eng.forward_us:g} us host per pass)", spans, total, []))
        if phase == "pp" and src.cfg.n_layer > ZOOM_LAYERS:  # whole-pass panels hide single layers
            layer = {n.name: n.layer for n in g.nodes}
            starts: dict[int, float] = {}
            for sp in spans:
                i = layer.get(sp.node)
                if i is not None and i < ZOOM_LAYERS:
                    starts[i] = min(starts.get(i, sp.start), sp.start)
            end = max(sp.end for sp in spans if layer.get(sp.node) is not None and layer[sp.node] < ZOOM_LAYERS)
            panels.append((f"PP zoomed on layers 0-{ZOOM_LAYERS - 1}: {end * 1e3:.1f} ms",
                           [sp for sp in spans if sp.start < end], end,
                           [(t, f"blk.{i}") for i, t in sorted(starts.items())]))
    how = f"split {split}" if split else ""
    how += (", " if how else "") + (f"pass {'+'.join(passes)}" if passes else "")
    title = f"{src.cfg.name or model} on {sysm.name}, {eng.name}, {how} (predicted)\n{facts}"
    return panels, devices, ops, title


def _spans_text(panels: Sequence[Panel], ops: dict[str, Op], fmt: str, title: str = "") -> str:
    """The trace as JSON (`title`, `spans`) or CSV (the title as '#' comment lines)."""
    rows = [{"phase": ph, "device": s.device, "start_s": round(s.start, 9), "end_s": round(s.end, 9),
             "node": s.node, "op": ops[s.node].value, "kind": op_kind(ops[s.node])}
            for ph, (_, spans, _, _) in zip(("pp", "tg"), panels[:1] + panels[-1:]) for s in spans]
    if fmt == "json":
        return json.dumps({"title": title, "spans": rows}, indent=1) + "\n"
    buf = io.StringIO()
    buf.write("".join(f"# {line}\n" for line in title.splitlines()))
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["phase"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def register(app: typer.Typer) -> None:
    if any(c.name == "show" for c in app.registered_commands):
        return  # main() registers on every call; once is enough

    @app.command("show")
    def show_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                 split: O.Split = None, devices: O.Devices = "2", ts: O.Ts = None, max_gpu: O.MaxGpu = None,
                 recurrent: O.Recurrent = "single", user_pass: O.UserPass = None, passes: O.Passes = None,
                 layers: Optional[str] = typer.Option(None, "--layers", help="layers A:B to draw (ops view "
                                                      "default: the first layer of each mixer kind)"),
                 view: str = typer.Option("layers", "--view", help="layers (whole model) | ops (a few layers)"),
                 phase: O.Phase = "pp",
                 quant: O.Quant = None,
                 kv_type: O.KvType = "f16",
                 title: Optional[str] = typer.Option(None, "--title", help="picture title (default: model, "
                                                     "split, devices, phase, quant)"),
                 format: Optional[str] = typer.Option(None, "--format", help="svg | png | dot | text "
                                                      "(default: from -o, else dot)"),
                 out: Optional[str] = typer.Option(None, "-o", "--out", help="placed.svg | .png | .dot | .txt",
                                                   callback=output_path),
                 ) -> None:
        """Draw MODEL placed on devices: a layer view of the whole model or an op view of a few layers."""
        fmt = _format(format, out)
        body = show(model, split=default_split(split, user_pass, "layer"), devices=devices, ts=ts, max_gpu=max_gpu, recurrent=recurrent,
                    passes=passes, user_passes=user_pass, layers=layers, view=view, phase=phase, quant=quant,
                    kv_type=kv_type, fmt=fmt, title=title)
        if isinstance(body, bytes):
            write_output(out or "-", body)
        else:
            emit(body, out)

    @app.command("timeline")
    def timeline_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                     hw: O.Hw = O.HW_DEFAULT, engine: O.Engine = O.ENGINE_DEFAULT,
                     quant: O.Quant = None,
                     kv_type: O.KvType = "f16",
                     split: O.Split = None, user_pass: O.UserPass = None, ts: O.Ts = None,
                     max_gpu: O.MaxGpu = None, recurrent: O.Recurrent = "single",
                     gpus: Optional[int] = typer.Option(None, "--gpus", help="use only the first N GPUs"),
                     depth: int = typer.Option(0, "--depth", help="N_KV: tokens already in the cache"),
                     ubatch: int = typer.Option(2048, "--ubatch", "-ub", help="tokens of the PP step"),
                     allow_overflow: bool = typer.Option(False, "--allow-overflow", help="draw placements that "
                                                         "do not fit the GPUs' memory (a warning, not an error)"),
                     out: str = typer.Option(..., "-o", "--out", help="timeline.png | .svg (chart), "
                                             ".csv | .json (the trace)", callback=output_path)) -> None:
        """Gantt chart per GPU of one predicted PP step and one TG step: where each GPU works and idles."""
        suffix = Path(out).suffix.lstrip(".").lower()
        if suffix not in ("png", "svg", "pdf", "csv", "json"):
            raise GraphirError(f"-o must end in .png, .svg, .pdf, .csv or .json, got {out!r}")
        panels, devs, ops, title = timeline(model, hw=hw, engine=engine, quant=quant, kv_type=kv_type,
                                            split=default_split(split, user_pass, "graph"), ts=ts, max_gpu=max_gpu,
                                            recurrent=recurrent, gpus=gpus, depth=depth, ubatch=ubatch,
                                            allow_overflow=allow_overflow, passes=user_pass)
        if suffix in ("csv", "json"):
            write_output(out, _spans_text(panels, ops, suffix, title))
        else:
            gantt(panels, devs, ops, title, out)
