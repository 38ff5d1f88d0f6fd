"""The executing backend: graphs run with PyTorch on `cpu`, `cpu:N` and `cuda:N` devices.

`KERNELS` (kernels.py) is the rule table, one kernel per op; `run_graph` (interp.py) the
graph walk; `Session` (session.py) the prefill/decode API with weights and state. Names are
exported lazily so that importing the package (the CLI does) does not import torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "KERNELS": "backends.cuda.kernels",
    "run_graph": "backends.cuda.interp",
    "ExecContext": "backends.cuda.interp",
    "ExecError": "backends.cuda.interp",
    "Session": "backends.cuda.session",
    "greedy": "backends.cuda.session",
    "open_weights": "backends.cuda.session",
    "RandomWeights": "backends.cuda.weights",
    "load_weights": "backends.cuda.weights",
    "reference_weights": "backends.cuda.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'backends.cuda' has no attribute {name!r}")
