"""Device and element-type names of the IR mapped onto PyTorch.

Graph devices are strings: `cpu`, `cpu:N` (several logical CPU devices share the one torch
CPU device, so that every placement runs in CI without a GPU) and `cuda:N`. Element types
are graphir DTypes; only plain types have a torch counterpart (quantised storage types are
dequantised when weights load, so kernels never see them).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import torch

from graphir.dtypes import DType, dtype
from graphir.errors import GraphirError
from passes.devices import parse_devices as placement_devices

_DEVICE_RE = re.compile(r"(cpu|cuda)(?::(\d+))?")

_TORCH: dict[str, torch.dtype] = {
    "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
    "i32": torch.int32, "i64": torch.int64, "i16": torch.int16, "i8": torch.int8, "bool": torch.bool,
}


class DeviceError(GraphirError):
    """A device name graphir cannot execute on here."""


@lru_cache(maxsize=256)
def torch_device(name: str) -> torch.device:
    """`cpu`, `cpu:1` -> the CPU; `cuda:N` -> that GPU (checked to exist)."""
    m = _DEVICE_RE.fullmatch(name.strip())
    if m is None:
        raise DeviceError(f"unknown device {name!r}: use cpu, cpu:N or cuda:N")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    idx = int(m.group(2) or 0)
    if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise DeviceError(f"device {name} is not available ({have} CUDA device(s) here)")
    return torch.device("cuda", idx)


def parse_devices(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`cpu` / `cpu,cpu:1` / ["cuda:0", "cuda:1"] / `2` -> canonical names (the placement's own
    grammar, passes.devices.parse_devices), each checked to exist here."""
    names = placement_devices(spec)
    for n in names:
        torch_device(n)
    return names


def torch_dtype(dt: DType | str) -> torch.dtype:
    d = dtype(dt)
    if d.name not in _TORCH:
        raise GraphirError(f"type {d.name} has no torch counterpart: the executor computes in f32, f16 or bf16")
    return _TORCH[d.name]


def describe(t: object) -> str:
    """`f32[7,32]` for a tensor (what error messages print)."""
    if isinstance(t, torch.Tensor):
        inv = {v: k for k, v in _TORCH.items()}
        return f"{inv.get(t.dtype, str(t.dtype))}[{','.join(str(s) for s in t.shape)}]"
    if isinstance(t, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in t.items()) + "}"
    return type(t).__name__
