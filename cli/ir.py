"""IR verbs: models, lower, stats."""

from __future__ import annotations

import json
from collections import Counter
from typing import Optional

import typer

from cli import options as O
from cli.common import emit, load_graph, output_path
from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.models.sources import load_preset, preset_names, weights_label
from graphir.ops import DEFS, Op
from graphir.serialize import to_dot, to_json
from graphir.stats import graph_stats
from graphir.text import to_text


def summary(g: Graph) -> str:
    ops = Counter(n.op.value for n in g.nodes)
    launches = sum(DEFS[n.op].launches for n in g.nodes)
    weights = [n for n in g.nodes if n.op == Op.WEIGHT]
    lines = [f"graph {g.info.get('model', '')} phase={g.info.get('phase')} layers={g.info.get('layers')}",
             f"  nodes {len(g)}  kernel launches {launches}  weights {len(weights)}  "
             f"states {len(g.by_op(Op.STATE_IN))}  outputs {len(g.by_op(Op.OUTPUT))}"]
    lines += [f"  {op:<16} {ops[op]:>6}" for op in sorted(ops)]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_cmd() -> None:
        """List the built-in model presets."""
        for name in preset_names():
            c = load_preset(name)
            extra = f" experts {c.n_expert}x top-{c.n_expert_used}" if c.is_moe else ""
            rec = f" recurrent {len(c.recurrent_layers)}" if c.recurrent_layers else ""
            typer.echo(f"{name:<20} {c.arch:<11} layers {c.n_layer:>3}  hidden {c.hidden_size:>5}  "
                       f"heads {c.n_head}/{c.n_kv_head}{extra}{rec}")

    @app.command("lower")
    def lower_cmd(model: str, phase: O.Phase = "pp",
                  ubatch: Optional[int] = typer.Option(None, "--ubatch", "-ub", help="bind T for the summary's sizes"),
                  layers: Optional[str] = typer.Option(None, help="keep layers A:B"),
                  quant: O.Quant = None,
                  kv_type: O.KvType = "f16",
                  format: str = typer.Option("text", "--format", help="text|json|dot|summary"),
                  out: Optional[str] = typer.Option(None, "-o", "--out", callback=output_path)) -> None:
        """Lower MODEL to the IR for one phase."""
        if format not in ("text", "json", "dot", "summary"):
            raise GraphirError(f"--format must be text, json, dot or summary, got {format!r}")
        _, g = load_graph(model, phase, quant, kv_type, layers)
        body = {"text": to_text, "json": lambda x: to_json(x, indent=1), "dot": to_dot, "summary": summary}[format](g)
        if ubatch and format == "summary":
            body += f"\n  bound T={ubatch}: activations of the largest node " \
                    f"{max(n.spec.nbytes_at({'T': ubatch, 'KV': 0}) for n in g.nodes if n.op != Op.WEIGHT):,} bytes"
        emit(body, out)

    @app.command("stats")
    def stats_cmd(model: str, quant: O.Quant = None,
                  kv_type: O.KvType = "f16",
                  depth: int = typer.Option(0, help="cache depth for flops_per_token"),
                  format: str = typer.Option("table", "--format", help="table|json")) -> None:
        """Parameters, weight bytes, KV and recurrent state sizes, FLOPs per token."""
        if format not in ("table", "json"):
            raise GraphirError(f"--format must be table or json, got {format!r}")
        src, g = load_graph(model, "tg", quant, kv_type)
        s = graph_stats(g, depth)
        d = {"model": src.cfg.name or str(model), "arch": src.cfg.arch, **s.as_dict(),
             "weights": weights_label(src, quant)}
        if format == "json":
            typer.echo(json.dumps(d, indent=1))
            return
        gib = 1024 ** 3
        typer.echo(f"{d['model']} ({d['arch']}), {d['weights']}, KV cache {s.kv_type}")
        typer.echo(f"  parameters         {s.params_total:>18,}")
        typer.echo(f"  active per token   {s.params_active:>18,}")
        typer.echo(f"  weight bytes       {s.weight_bytes:>18,}  ({s.weight_bytes / gib:.2f} GiB, "
                   f"{8 * s.weight_bytes / s.params_total:.2f} bits/weight)")
        typer.echo(f"  KV bytes / token   {s.kv_bytes_per_token:>18,}")
        typer.echo(f"  recurrent / seq    {s.recurrent_bytes_per_seq:>18,}")
        typer.echo(f"  FLOPs / token      {s.flops_per_token:>18,}  (depth {depth})")
