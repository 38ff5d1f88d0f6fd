"""Rendering predictions: the sweep-bench table with breakdowns, JSON, CSV and a plot."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from backends.costmodel.predict import TERM_LABELS, ModePrediction, Prediction
from backends.costmodel.timeline import TERMS
from graphir.sweep import format_markdown, write_csv


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write via a temp file beside the target and os.replace: never a half-written file."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
           f"TG {wl.tg}, ctx {wl.ctx}\n"]
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
                       + ", ".join(f"{g:.1f} GB" for g in m.memory_GB) + "\n")
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
    write_csv(pred.table().rows, buf, comment=f"predicted: {pred.model} on {pred.system.name}, "
                                              f"engine {pred.engine.name}")
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
        "memory_GB": list(m.memory_GB),
    }


def format_json(pred: Prediction) -> str:
    doc: dict[str, Any] = {
        "model": pred.model, "hw": pred.system.name, "gpu": pred.system.gpu.name, "gpus": pred.system.count,
        "link": pred.system.link.name, "engine": pred.engine.name,
        "workload": {"ubatch": pred.workload.ubatch, "tg": pred.workload.tg, "ctx": pred.workload.ctx},
        "terms": list(TERMS), "modes": {k: _mode_json(m) for k, m in pred.modes.items()},
        "warnings": list(pred.warnings),
    }
    if "layer" in pred.modes and "graph" in pred.modes:
        doc["crossover"] = {m: pred.crossover(m) for m in ("pp", "tg")}
        doc["speedup_graph_over_layer"] = {m: [float(x) for x in pred.speedup(m)] for m in ("pp", "tg")}
    return json.dumps(doc, indent=1) + "\n"


def plot(pred: Prediction, path: str | Path) -> None:
    """S_PP and S_TG against depth, one line per split mode, crossovers marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "pp", "prompt processing S_PP"), (axes[1], "tg", "generation S_TG")):
        for split, m in pred.modes.items():
            ax.plot(m.depths / 1000, [r.speed(metric) for r in m.rows], label=split)  # type: ignore[arg-type]
        if "layer" in pred.modes and "graph" in pred.modes:
            x = pred.crossover(metric)
            if x is not None:
                ax.axvline(x / 1000, color="grey", ls=":", label=f"crossover {x / 1000:.1f}k")
        ax.set_xlabel("N_KV (thousand tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{pred.model} on {pred.system.name}, {pred.engine.name} (predicted)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
