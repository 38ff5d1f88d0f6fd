"""One op through the interpreter: a one-node graph built around the op, run by run_graph, so
the interpreter's spec check (shape and type with T/KV bound) applies to every kernel test."""

from __future__ import annotations

import torch

from backends.cuda.runtime.interp import ExecContext, run_graph
from backends.cuda.reference.kernels import KERNELS
from graphir.builder import Builder
from graphir.ops import Op
from graphir.spec import TensorSpec

NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int32: "i32"}


def run_op(op: Op, *args: torch.Tensor, devices: tuple[str | None, ...] = (), node_device: str | None = None,
           buffers: dict | None = None, state: str | None = None, **attrs: object) -> object:
    """Execute one op on `args` through run_graph; returns the op's value."""
    b = Builder()
    names = []
    for i, a in enumerate(args):
        spec = TensorSpec(tuple(a.shape), NAMES[a.dtype])
        dev = devices[i] if devices else None
        if state is not None and i == 0:
            names.append(b.leaf(Op.STATE_IN, f"in{i}", spec, device=dev, state=state))
        else:
            names.append(b.leaf(Op.INPUT, f"in{i}", spec, device=dev, role="test"))
    y = b.emit(op, "y", *names, device=node_device, **attrs)
    b.emit(Op.OUTPUT, "y.out", y, key="y", device=node_device)
    g = b.graph()
    ctx = ExecContext(g, {}, {f"in{i}": a for i, a in enumerate(args)}, {}, buffers or {})
    return run_graph(g, ctx, KERNELS)["y"]
