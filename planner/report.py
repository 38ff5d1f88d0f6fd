"""Rendering predictions: the sweep-bench table with breakdowns, JSON, CSV and a plot."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from planner.predict import TERM_LABELS, ModePrediction, Prediction
from backends.costmodel.timeline import TERMS
from graphir.fileio import write_atomic as atomic_write
from reports.sweep import SweepTable, format_markdown, write_csv
from reports.sweep_compare import Comparison, crossover
from passes.memory import GIB


def _gib(gb: float) -> float:
    """The cost model's profiles count decimal GB; every output says GiB."""
    return round(gb * 1e9 / GIB, 6)  # text rounds to 0.01; JSON keeps what small models need


def header_lines(pred: Prediction) -> list[str]:
    """What every format states before its rows: the weight and KV types priced, the memory per
    GPU (GiB) of each split against the GPU's, and any adjustment of the workload."""
    mem = "; ".join(f"{split} " + ", ".join(f"{_gib(gb):.2f}" for gb in m.memory_GB)
                    for split, m in pred.modes.items() if m.memory_GB)
    out = [f"{pred.weights or 'weights ?'}, KV {pred.kv_type or '?'}; memory per GPU (GiB, of "
           f"{_gib(pred.system.gpu.mem_GB):.2f} each): {mem or '-'}"]
    return out + [f"note: {n}" for n in pred.notes]


def _share(m: ModePrediction, phase: str) -> tuple[list[str], np.ndarray]:
    tl = m.pp if phase == "pp" else m.tg
    return m.dominant(phase), tl.terms.max(axis=0) / tl.total


def mode_dominant(m: ModePrediction, phase: str) -> tuple[str, float]:
    """The term with the largest share of the whole sweep's time."""
    tl = m.pp if phase == "pp" else m.tg
    tot = tl.terms.sum(axis=1)
    i = int(np.argmax(tot))
    return TERMS[i], float(tot[i] / tot.sum())


def _fmt_depth(x: float | None) -> str:
    return "never (within the sweep)" if x is None else f"{x:,.0f} tokens"


def format_table(pred: Prediction) -> str:
    wl = pred.workload
    out = [f"# {pred.model} on {pred.system.name} ({pred.system.count}x {pred.system.gpu.name}, "
           f"link {pred.system.link.name}), engine {pred.engine.name}; u-batch {wl.ubatch}, "
           f"TG {wl.tg}, ctx {wl.ctx}\n"] + [f"# {line}\n" for line in header_lines(pred)]
    for split, m in pred.modes.items():
        out.append(f"\n## split mode {split}\n\n")
        out.append(format_markdown(m.rows))
        dom_pp, sh_pp = _share(m, "pp")
        dom_tg, sh_tg = _share(m, "tg")
        u_pp, u_tg = m.utilisation("pp"), m.utilisation("tg")
        e_pp, e_tg = m.energy_per_token("pp"), m.energy_per_token("tg")
        out.append("\n|   N_KV | PP dominant          | TG dominant          | util PP   | util TG   "
                   "| J/tok PP | J/tok TG |\n")
        out.append("|--------|----------------------|----------------------|-----------|-----------"
                   "|----------|----------|\n")
        for j, d in enumerate(m.depths):
            up = "/".join(f"{u:.0%}" for u in u_pp[:, j])
            ut = "/".join(f"{u:.0%}" for u in u_tg[:, j])
            out.append(f"| {int(d):6d} | {dom_pp[j]:<12} {sh_pp[j]:>6.0%} | {dom_tg[j]:<12} {sh_tg[j]:>6.0%} "
                       f"| {up:<9} | {ut:<9} | {e_pp[j]:8.3f} | {e_tg[j]:8.2f} |\n")
        for ph in ("pp", "tg"):
            t, s = mode_dominant(m, ph)
            out.append(f"{split} {ph.upper()}: dominant term {TERM_LABELS[t]} ({s:.0%} of the sweep's time)\n")
        if m.memory_GB:
            out.append(f"{split}: memory per device (weights + caches at ctx) "
                       + ", ".join(f"{_gib(g):.2f} GiB" for g in m.memory_GB) + "\n")
    names = list(pred.modes)
    if "layer" in pred.modes and "graph" in pred.modes:
        out.append("\n## graph vs layer\n\n")
        for metric in ("pp", "tg"):
            sp = pred.speedup(metric)
            out.append(f"{metric.upper()}: crossover depth {_fmt_depth(pred.crossover(metric))}; "
                       f"graph/layer speed x{sp[0]:.2f} at N_KV=0, x{sp[-1]:.2f} at N_KV={int(pred.modes['layer'].depths[-1])}\n")
    elif len(names) > 1:
        out.append(f"\ncrossover {names[1]} vs {names[0]}: PP {_fmt_depth(pred.crossover('pp', names[0], names[1]))}, "
                   f"TG {_fmt_depth(pred.crossover('tg', names[0], names[1]))}\n")
    out += [f"warning: {w}\n" for w in pred.warnings]
    return "".join(out)


def format_csv(pred: Prediction) -> str:
    buf = io.StringIO()
    wl = pred.workload
    write_csv(pred.table().rows, buf, comment="\n".join(
        [f"predicted: {pred.model} on {pred.system.name}, engine {pred.engine.name}; u-batch {wl.ubatch}, "
         f"TG {wl.tg}, ctx {wl.ctx}"] + header_lines(pred)))
    return buf.getvalue()


def _mode_json(m: ModePrediction) -> dict[str, Any]:
    def terms(tl: Any) -> dict[str, list[float]]:
        return {t: [float(v) for v in tl.terms[i]] for i, t in enumerate(TERMS)}

    return {
        "rows": [{k: getattr(r, k) for k in ("pp", "tg", "n_kv", "t_pp_s", "s_pp_tps", "t_tg_s", "s_tg_tps")}
                 for r in m.rows],
        "breakdown_s": {"pp_per_ubatch": terms(m.pp), "tg_per_token": terms(m.tg)},
        "dominant": {"pp": m.dominant("pp"), "tg": m.dominant("tg")},
        "utilisation": {ph: m.utilisation(ph).T.round(4).tolist() for ph in ("pp", "tg")},
        "energy_j_per_token": {ph: [float(x) for x in m.energy_per_token(ph)] for ph in ("pp", "tg")},
        "memory_GiB": [_gib(g) for g in m.memory_GB],
    }


def format_json(pred: Prediction) -> str:
    doc: dict[str, Any] = {
        "model": pred.model, "hw": pred.system.name, "gpu": pred.system.gpu.name, "gpus": pred.system.count,
        "link": pred.system.link.name, "engine": pred.engine.name,
        "workload": {"ubatch": pred.workload.ubatch, "tg": pred.workload.tg, "ctx": pred.workload.ctx},
        "weights": pred.weights, "kv_type": pred.kv_type, "gpu_memory_GiB": _gib(pred.system.gpu.mem_GB),
        "memory_GiB_per_gpu": {k: [_gib(g) for g in m.memory_GB] for k, m in pred.modes.items()},
        "terms": list(TERMS), "modes": {k: _mode_json(m) for k, m in pred.modes.items()},
        "warnings": list(pred.warnings), "notes": list(pred.notes),
    }
    if "layer" in pred.modes and "graph" in pred.modes:
        doc["crossover"] = {m: pred.crossover(m) for m in ("pp", "tg")}
        doc["speedup_graph_over_layer"] = {m: [float(x) for x in pred.speedup(m)] for m in ("pp", "tg")}
    return json.dumps(doc, indent=1) + "\n"


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically, byte-identical from run to run (no dates, fixed ids)."""
    import matplotlib
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    meta = {"svg": {"Date": None}, "png": {"Software": None}, "pdf": {"CreationDate": None}}.get(fmt, {})
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "graphir"}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _speeds(t: SweepTable, metric: str) -> tuple[list[float], list[float]]:
    """(N_KV in thousands, speed) of a table's rows, for plotting."""
    return [r.n_kv / 1000 for r in t.rows], [r.speed(metric) for r in t.rows]  # type: ignore[arg-type]


def plot(pred: Prediction, path: str | Path, measured: Mapping[str, SweepTable] | None = None) -> None:
    """S_PP and S_TG against depth, one line per split mode, measured points (per split) and
    the crossovers (predicted dotted, measured dashed) marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    measured = measured or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "pp", "prompt processing S_PP"), (axes[1], "tg", "generation S_TG")):
        for k, (split, m) in enumerate(pred.modes.items()):
            ax.plot(m.depths / 1000, [r.speed(metric) for r in m.rows], color=f"C{k}",  # type: ignore[arg-type]
                    label=f"{split} predicted" if measured else split)
            if split in measured:
                t = measured[split]
                ax.plot(*_speeds(t, metric), "o", ms=3.5, mfc="none", color=f"C{k}", label=f"{split} measured")
        if "layer" in pred.modes and "graph" in pred.modes:
            x = pred.crossover(metric)
            if x is not None:
                ax.axvline(x / 1000, color="grey", ls=":", label=f"crossover {x / 1000:.1f}k (predicted)")
            else:
                ax.plot([], [], " ", label=f"no crossover below {pred.modes['layer'].depths[-1] / 1000:.0f}k")
        if "layer" in measured and "graph" in measured:
            xm = crossover(measured["layer"], measured["graph"], metric)  # type: ignore[arg-type]
            if xm is not None:
                ax.axvline(xm / 1000, color="black", ls="--", lw=0.8, label=f"crossover {xm / 1000:.1f}k (measured)")
        ax.set_xlabel("N_KV (thousand tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    wl = pred.workload
    fig.suptitle(f"{pred.model} on {pred.system.name}, {pred.engine.name}: u-batch {wl.ubatch}, TG {wl.tg}"
                 f"{' (lines predicted, circles measured)' if measured else ' (predicted)'}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_compare(results: Sequence[tuple[str, str, SweepTable, SweepTable, Comparison]], ref: str,
                 path: str | Path) -> None:
    """`graphir compare --plot`: speeds of the reference (circles) and each table (lines) per
    split, and the per-depth error of each table against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    refs: dict[str, SweepTable] = {}
    for k, (split, label, a, b, c) in enumerate(results):
        refs.setdefault(split, a)
        for j, metric in enumerate(("pp", "tg")):
            ax, ex = axes[0][j], axes[1][j]
            name = f"{label} ({split})" if split else label
            ax.plot(*_speeds(b, metric), color=f"C{k}", label=name)
            ex.plot([r.n_kv / 1000 for r in c.rows], [100 * getattr(r, f"err_{metric}") for r in c.rows],
                    color=f"C{k}", marker=".", ms=3, label=name)
    for k, (split, a) in enumerate(refs.items()):
        for j, metric in enumerate(("pp", "tg")):
            color = "black" if len(refs) == 1 else f"C{len(results) + k}"
            axes[0][j].plot(*_speeds(a, metric), "o", ms=3.5, mfc="none", color=color,
                            label=f"{ref} ({split})" if split else ref)
    for j, metric in enumerate(("S_PP", "S_TG")):
        axes[0][j].set_title(f"{metric} (tokens/s)")
        axes[0][j].legend(fontsize=8)
        axes[1][j].axhline(0, color="grey", lw=0.8)
        axes[1][j].set_ylabel("error vs reference (%)")
        axes[1][j].set_xlabel("N_KV (thousand tokens)")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
    fig.suptitle(f"compared with {ref} (circles); error = speed / reference speed - 1")
    fig.tight_layout()
    save_figure(fig, path)
