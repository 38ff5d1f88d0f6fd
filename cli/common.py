"""Pieces every CLI verb shares: resolving MODEL with its quant scheme, --layers, outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graphir.errors import GraphirError
from graphir.fileio import check_output, write_output
from graphir.fileio import write_atomic  # noqa: F401  (re-exported: the old name of write_output)
from graphir.models import BuildOptions, build
from graphir.models.sources import ModelSource, load_source, weight_scheme
from graphir.graph import Graph


def parse_layers(spec: str | None, n_layer: int) -> range | None:
    """`A:B` (either end optional) -> range; validated against the model's layer count."""
    if not spec:
        return None
    try:
        a, _, b = spec.partition(":")
        lo = int(a) if a else 0
        hi = int(b) if b else n_layer
    except ValueError:
        raise GraphirError(f"--layers must look like A:B, got {spec!r}") from None
    if not (0 <= lo < hi <= n_layer):
        raise GraphirError(f"--layers {spec} is outside 0:{n_layer}")
    return range(lo, hi)


def load_graph(model: str, phase: str = "pp", quant: str | None = None, kv_type: str = "f16",
               layers: str | None = None, act: str = "f32", logits: str = "all") -> tuple[ModelSource, Graph]:
    if phase not in ("pp", "tg"):
        raise GraphirError(f"--phase must be pp or tg, got {phase!r}")
    src = load_source(model)
    opts = BuildOptions(phase=phase, act_dtype=act, quant=weight_scheme(src, quant), kv_type=kv_type,
                        logits=logits)  # type: ignore[arg-type]
    return src, build(src.cfg, opts, parse_layers(layers, src.cfg.n_layer))


def emit(text: str, out: str | None) -> None:
    """Print to stdout (no `out`, or `-`), or write to `out` with the one output writer."""
    if not out or str(out) == "-":
        text = text if text.endswith("\n") else text + "\n"
    write_output(out or "-", text)


PLOT_SUFFIXES = ("png", "svg", "pdf")


def output_path(value: Any) -> Any:
    """typer callback of an output option: refuse, before any work, a path no file can be
    written at (a folder, a missing folder)."""
    if value is not None:
        check_output(value)
    return value


def plot_path(value: Any) -> Any:
    """typer callback of a picture option: an extension matplotlib writes, and a writable path."""
    if value is not None and str(value) != "-":
        suffix = Path(value).suffix.lstrip(".").lower()
        if suffix not in PLOT_SUFFIXES:
            raise GraphirError(f"{value}: a plot is written as .png, .svg or .pdf, not {suffix or 'no extension'!r}")
    return output_path(value)


def default_split(split: str | None, user_passes: Any, default: str | None) -> str | None:
    """--split left out: the verb's default (layer, as llama.cpp's -sm), or none when a --pass is
    given: the user's passes place the graph (docs/writing_a_pass.md)."""
    if split is not None:
        return split
    return None if user_passes else default
