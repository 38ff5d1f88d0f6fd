"""`graphir eval`: run a prompt and greedy decode steps, write the logits.

torch is imported only when the verb runs, so other verbs never pay for it.
"""

from __future__ import annotations

import io
from typing import Optional

import typer

from graphir.errors import GraphirError


def parse_tokens(spec: str) -> list[int]:
    try:
        ids = [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise GraphirError(f"--tokens must be comma-separated integers, got {spec!r}") from None
    if not ids:
        raise GraphirError("--tokens is empty")
    return ids


def evaluate(model: str, tokens: list[int], decode: int = 0, dtype: str = "f32", devices: str = "cpu",
             seed: int = 0, ctx: int | None = None, out: str | None = None) -> list[int]:
    """The `eval` verb as a function: returns the generated ids; writes logits [P+N, vocab]
    float32 to `out` (.npy, atomically) when given."""
    import numpy as np

    from backends.cuda.devices import parse_devices
    from backends.cuda.session import Session, greedy
    from graphir.cli_common import write_atomic
    from graphir.models.sources import load_source

    if decode < 0:
        raise GraphirError(f"--decode must be >= 0, got {decode}")
    if dtype not in ("f32", "bf16", "f16"):
        raise GraphirError(f"--dtype must be f32, bf16 or f16, got {dtype!r}")
    devs = parse_devices(devices)
    if len(devs) > 1:
        raise GraphirError(f"{len(devs)} devices given: running on several needs a split mode, which eval "
                           f"does not offer yet; give one device")
    need = len(tokens) + decode
    if ctx is not None and ctx < need:
        raise GraphirError(f"--ctx {ctx} is shorter than the {len(tokens)} prompt + {decode} decoded tokens")
    source = load_source(model)
    session = Session(source, None, devs, ctx or need, dtype=dtype, seed=seed)
    logits, generated = greedy(session, tokens, decode)
    if out:
        buf = io.BytesIO()
        np.save(buf, logits.numpy().astype(np.float32))
        write_atomic(out, buf.getvalue())
    return generated


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(model: str = typer.Argument(..., help="preset, config.json, checkpoint dir or .gguf"),
                 tokens: str = typer.Option(..., "--tokens", help="prompt token ids, e.g. 3,1,4"),
                 decode: int = typer.Option(0, "--decode", help="greedy decode steps after the prompt"),
                 dtype: str = typer.Option("f32", "--dtype", help="f32, bf16 or f16"),
                 devices: str = typer.Option("cpu", "--devices", help="cpu, cpu:N or cuda:N"),
                 seed: int = typer.Option(0, "--seed", help="seed of random weights (when MODEL has none)"),
                 ctx: Optional[int] = typer.Option(None, "--ctx", help="context to preallocate (default: just enough)"),
                 out: Optional[str] = typer.Option(None, "--out", help="write logits [P+N, vocab] float32 .npy")) -> None:
        """Run MODEL on a prompt, then greedy decode steps; print the generated ids."""
        generated = evaluate(model, parse_tokens(tokens), decode, dtype, devices, seed, ctx, out)
        typer.echo(",".join(str(t) for t in generated))
