"""Pieces every CLI verb shares: resolving MODEL with its quant scheme, --layers, atomic writes."""

from __future__ import annotations

import sys
from pathlib import Path

from graphir.errors import GraphirError
from graphir.fileio import write_atomic
from graphir.models import BuildOptions, build
from graphir.models.sources import ModelSource, load_source, weight_scheme
from graphir.graph import Graph
from graphir.quant import QuantScheme


def source_quant(src: ModelSource, quant: str | None) -> QuantScheme:
    """--quant wins; else a GGUF's own tensor table; else the checkpoint's torch dtype."""
    return weight_scheme(src, quant)


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
    opts = BuildOptions(phase=phase, act_dtype=act, quant=source_quant(src, quant), kv_type=kv_type,
                        logits=logits)  # type: ignore[arg-type]
    return src, build(src.cfg, opts, parse_layers(layers, src.cfg.n_layer))


def emit(text: str, out: str | None) -> None:
    """Print to stdout, or write atomically to `out`."""
    if out:
        write_atomic(out, text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
