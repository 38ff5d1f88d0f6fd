"""`graphir gguf`: write a model as a GGUF file with random weights (llama.cpp's layout), so
other engines can be timed on the same shapes without downloading weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from graphir.errors import GraphirError


def register(app: typer.Typer) -> None:
    @app.command("gguf")
    def gguf_cmd(model: str,
                 out: str = typer.Option(..., "-o", "--out", help="the .gguf file to write"),
                 type: str = typer.Option("f16", "--type", help="matrices' type: f16, bf16, f32, q8_0, q4_0, "
                                                               "q5_0, q4_k, q6_k, iq4_nl, iq4_xs, iq4_ks"),
                 layers: Optional[str] = typer.Option(None, help="the first N layers: N or 0:N"),
                 seed: int = typer.Option(0, help="random weights' seed")) -> None:
        """Write MODEL (a preset or config) as a GGUF with random weights."""
        from cli.common import parse_layers
        from graphir.models.gguf_writer import storage_type, write_gguf
        from graphir.models.sources import load_source

        cfg = load_source(model).cfg
        storage_type(type)  # refuse a bad type before any work
        if layers:
            r = parse_layers(layers if ":" in layers else f"0:{layers}", cfg.n_layer)
            if r is None or r.start != 0:
                raise GraphirError(f"--layers {layers}: a GGUF holds the first N layers (0:N)")
            cfg = cfg.with_layers(r.stop)
        path = Path(out)
        if not path.parent.is_dir():
            raise GraphirError(f"{path.parent}: no such directory")
        types = write_gguf(path, cfg, wtype=type, seed=seed)
        typer.echo(f"{path}: {cfg.name or model} {cfg.n_layer} layers, {len(types)} tensors, "
                   f"{path.stat().st_size / 1e9:.2f} GB")
