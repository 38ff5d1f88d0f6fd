"""The executing backend: graphs run with PyTorch on `cpu`, `cpu:N` and `cuda:N` devices.

Subpackages: `reference` (the reference kernels, `KERNELS`), `triton_kernels` (the Triton
fast paths), `rules` (the rule tables laid over the reference, the engine's passes), `runtime`
(`run_graph`, `Session`, processes, devices, streams), `weights` (weight sources, formats,
loading) and `capture` (the decode step in CUDA graphs). Names are exported lazily so that
importing the package (the CLI does) does not import torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "KERNELS": "backends.cuda.reference.kernels",
    "run_graph": "backends.cuda.runtime.interp",
    "ExecContext": "backends.cuda.runtime.interp",
    "ExecError": "backends.cuda.runtime.interp",
    "Session": "backends.cuda.runtime.session",
    "greedy": "backends.cuda.runtime.session",
    "open_weights": "backends.cuda.runtime.session",
    "RandomWeights": "backends.cuda.weights.sources",
    "load_weights": "backends.cuda.weights.sources",
    "reference_weights": "backends.cuda.weights.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'backends.cuda' has no attribute {name!r}")
