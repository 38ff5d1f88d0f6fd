"""Turn bench_gpu.py's results.json files into docs/results markdown and CSV.

    python bench/bench_gpu_report.py OUTDIR results.json [results2.json ...] [--log LOG ...]

A sweep that failed part-way keeps no rows in results.json; `--log` recovers the rows it
finished from the progress lines of bench_gpu.py's log (speeds printed to 0.01 t/s; times
are recomputed as tokens / speed).

For every sweep: the llama-sweep-bench table, a CSV beside it, and per depth the fraction of
the HBM roofline reached in TG and of the matmul ceiling in PP, with the ceilings measured in
the same run:
  TG bytes per token = weights a token reads (routed experts at k/E, one embedding row, all
         other weights; in the compute type, as the executor holds them) + KV cache rows at
         that depth + recurrent state read and written; roofline time = bytes / (copy
         bandwidth x GPUs working at once: 1 for one GPU and layer split, 2 for graph split)
  PP FLOPs = graphir.stats.node_flops over the unplaced prefill graph (T = ubatch, KV = depth,
         logits of the last token only); fraction = FLOPs / T_PP / (matmul rate x GPUs at once)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.common import parse_layers  # noqa: E402
from graphir.dtypes import dtype  # noqa: E402
from graphir.graph import Graph  # noqa: E402
from graphir.models import BuildOptions, build  # noqa: E402
from graphir.models.sources import load_source  # noqa: E402
from graphir.ops import Op  # noqa: E402
from graphir.stats import node_flops  # noqa: E402
from reports.sweep import SweepRow, format_markdown, write_csv  # noqa: E402


def graphs(model: str, layers: str | None) -> tuple[Any, Graph, Graph]:
    src = load_source(model)
    rng = parse_layers(layers if layers not in (None, "all") else None, src.cfg.n_layer)
    tg = build(src.cfg, BuildOptions(phase="tg", act_dtype="bf16", kv_type="bf16"), rng)
    pp = build(src.cfg, BuildOptions(phase="pp", act_dtype="bf16", kv_type="bf16", logits="last"), rng)
    return src.cfg, tg, pp


def tg_bytes(g: Graph, depth: int) -> int:
    """Bytes one decoded token moves at cache depth `depth` (see the module docstring)."""
    act = dtype("bf16").type_size
    users = g.users
    total = 0
    for n in g.nodes:
        if n.op == Op.WEIGHT:
            numel = n.spec.numel_at({})
            readers = [g[u] for u in users.get(n.name, ())]
            if any(r.op == Op.MOE_MATMUL for r in readers):
                topk = next(x for x in g.nodes if x.op == Op.MOE_TOPK)
                numel = numel * int(topk.attr["k"]) // int(n.spec.shape[0])
            elif readers and all(r.op == Op.GET_ROWS for r in readers):
                numel = int(n.spec.shape[1])
            total += numel * act
        elif n.op == Op.STATE_IN:
            first = n.spec.shape[0]
            if isinstance(first, str) or not isinstance(first, int):
                total += n.spec.nbytes_at({"KV": depth + 1})
            else:
                total += 2 * n.spec.nbytes_at({})
    return total


def pp_flops(g: Graph, ubatch: int, depth: int) -> int:
    env = {"T": ubatch, "KV": depth}
    return sum(node_flops(g, n, env) for n in g.nodes)


def derived(sweep: dict[str, Any], ceil: dict[str, Any]) -> list[dict[str, float]]:
    meta = sweep["meta"]
    _, tg, pp = graphs(sweep["model"], meta.get("layers"))
    # GPUs working at once: one for a single GPU and layer split; the GPUs a layer spans for
    # graph split (max_gpu of them when capped) and auto (an upper bound: its parts may span fewer)
    n = len(meta.get("devices") or [0])
    cap = sweep["args"].get("max_gpu") or n
    gpus = min(n, cap) if meta["split"].startswith(("graph", "auto")) else 1
    bw = min(c["copy_bytes_per_s"] for c in ceil.values()) * gpus
    rate = min(c["bf16_matmul_flops"] for c in ceil.values()) * gpus
    out = []
    for r in sweep["rows"]:
        b = tg_bytes(tg, r["n_kv"])
        f = pp_flops(pp, r["pp"], r["n_kv"])
        t_tok = r["t_tg_s"] / r["tg"]
        out.append({"n_kv": r["n_kv"], "tg_bytes": b, "tg_roof_ms": b / bw * 1e3, "tg_ms": t_tok * 1e3,
                    "tg_frac": b / bw / t_tok, "pp_tflop": f / 1e12, "pp_tflops": f / r["t_pp_s"] / 1e12,
                    "pp_frac": f / r["t_pp_s"] / rate})
    return out


def section(key: str, sweep: dict[str, Any], ceil: dict[str, Any], out: Path) -> str:
    cfg = load_source(sweep["model"]).cfg
    dense = not any(cfg.is_recurrent(i) for i in range(cfg.n_layer))
    rows = [SweepRow(**{**r, "split": "graph" if dense and r["split"].startswith("graph") else r["split"]})
            for r in sweep["rows"]]
    write_csv(rows, out / f"{key}.csv", comment=f"{sweep['model']} " +
              " ".join(f"{k}={v}" for k, v in sweep["args"].items()))
    d = derived(sweep, ceil)
    lines = [format_markdown(rows), "",
             "| N_KV | TG bytes/token | TG roofline ms | TG ms/token | TG % of roofline | PP TFLOP | PP TFLOP/s | "
             "PP % of matmul ceiling |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in d:
        lines.append(f"| {x['n_kv']} | {x['tg_bytes'] / 1e9:.3f} GB | {x['tg_roof_ms']:.3f} | {x['tg_ms']:.3f} | "
                     f"{100 * x['tg_frac']:.1f} | {x['pp_tflop']:.2f} | {x['pp_tflops']:.1f} | {100 * x['pp_frac']:.1f} |")
    return "\n".join(lines) + "\n"


def command(sweep: dict[str, Any]) -> str:
    a = sweep["args"]
    parts = [f"graphir run {sweep['model']}", f"--devices {a['devices']}"]
    if a.get("split"):
        parts.append(f"--split {a['split']}")
        if a["split"] == "graph" and "recurrent" in a:
            parts.append(f"--recurrent {a['recurrent']}")
        if a.get("max_gpu"):
            parts.append(f"--max-gpu {a['max_gpu']}")
        if a["split"] == "auto":
            parts.append(f"--hw {a.get('hw', '2xH200')} --engine {a.get('engine', 'graphir-cuda')}")
    parts += [f"--dtype {a['dtype']}", f"--ubatch {a['ubatch']}", f"--tg {a['tg']}", f"--ctx {a['ctx']}"]
    if a.get("layers"):
        parts.append(f"--layers {a['layers']}")
    return " ".join(parts) + " --format csv -o FILE"


def recover(log: str, merged: dict[str, Any]) -> None:
    """Rows of failed sweeps from lines like `  b-layer N_KV   2048: S_PP  8909.33 t/s  S_TG  119.66 t/s`."""
    import re

    pat = re.compile(r"\]\s+(\S+) N_KV\s+(\d+): S_PP\s+([\d.]+) t/s\s+S_TG\s+([\d.]+) t/s")
    found: dict[str, list[dict[str, Any]]] = {}
    for line in log.splitlines():
        m = pat.search(line)
        if m:
            found.setdefault(m.group(1), []).append({"n_kv": int(m.group(2)), "s_pp": float(m.group(3)),
                                                     "s_tg": float(m.group(4))})
    for key, rows in found.items():
        sweep = merged.get("sweeps", {}).get(key)
        if not sweep or "rows" in sweep:
            continue
        a = sweep["args"]
        split = a.get("split") or "single"
        label = f"graph-{a.get('recurrent', 'single')}" if split == "graph" else split
        sweep["rows"] = [SweepRow.from_times(a["ubatch"], a["tg"], r["n_kv"], a["ubatch"] / r["s_pp"],
                                             a["tg"] / r["s_tg"], label).__dict__ for r in rows]
        err = str(sweep.get("error", "")).splitlines()[0]
        sweep["meta"] = {"split": label, "layers": a.get("layers"), "stopped_by": err}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    merged: dict[str, Any] = {}
    args = sys.argv[2:]
    logs = [args[i + 1] for i, x in enumerate(args) if x == "--log"]
    files = [x for i, x in enumerate(args) if x != "--log" and (i == 0 or args[i - 1] != "--log")]
    for p in files:
        doc = json.loads(Path(p).read_text())
        for k, v in doc.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k].update(v)
            else:
                merged[k] = v
    for lg in logs:
        recover(Path(lg).read_text(), merged)
    (out / "raw.json").write_text(json.dumps(merged, indent=1, default=str))
    ceil = merged["ceilings"]
    for key, sweep in merged.get("sweeps", {}).items():
        if "rows" not in sweep:
            continue
        text = [f"# {key}: {sweep['model']} ({sweep['meta']['split']})", "",
                f"Command: `{command(sweep)}` (run by bench/bench_gpu.py)", "",
                f"Machine: {', '.join(merged['machine']['gpus'])}; torch {merged['machine']['torch']}; "
                f"date {merged['machine']['date']}", "",
                f"Meta: `{json.dumps({k: v for k, v in sweep['meta'].items() if k not in ('fast_paths', 'auto_plan')})}`",
                "", section(key, sweep, ceil, out)]
        if sweep["meta"].get("auto_plan"):
            text += ["", "The auto plan this run executed (searched before the run with the engine profile of "
                     "that time):", "", "```", sweep["meta"]["auto_plan"].rstrip(), "```", ""]
        (out / f"{key}.md").write_text("\n".join(text))
        print(f"wrote {key}")


if __name__ == "__main__":
    main()
