"""The CLI as an oracle's subject: `graphir eval` of a saved checkpoint compared with transformers.
A helper of the tests (it drives cli/, which the backend's own helpers may not import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.hf_oracle import hf_logits, rel_err
from cli.main import main
from cli.run import make_transform


def cli_eval(model: Any, ckpt: Path, prompt: list[int], decode: int, *args: str) -> tuple[float, list[int], list[int]]:
    """`graphir eval` of a saved checkpoint with extra CLI args (placement); returns the logits'
    error relative to transformers (`model`) over prompt + generated, graphir's generated ids, and
    transformers' greedy choices at the same rows."""
    out = ckpt.parent / f"{ckpt.name}.logits.npy"
    rc = main(["eval", str(ckpt), "--tokens", ",".join(map(str, prompt)), "--decode", str(decode), "--out", str(out),
               *args])
    if rc != 0:
        raise AssertionError(f"graphir eval exited {rc}")
    logits = torch.from_numpy(np.load(out))
    generated = [int(r.argmax()) for r in logits[len(prompt) - 1:-1]]
    ref = hf_logits(model, prompt + generated)
    return rel_err(logits, ref), generated, [int(r.argmax()) for r in ref[len(prompt) - 1:-1]]


def placement(cfg: Any, devices: tuple[str, ...], mode: str, ts: str, placed: list[Any]) -> Any:
    """`graphir eval --split mode --ts ts`'s transform, keeping each placed graph in `placed`."""
    def transform(g: Any) -> Any:
        for t in make_transform(cfg, devices, mode, ts):
            g = t(g)
        placed.append(g)
        return g

    return transform
