"""Matmul weights kept in their GGUF blocks through loading and execution (`Session(keep_quant=True)`).

A kept weight is a `repack.Packed` where a tensor would be: the loader stores it among the
session's weights, the matmul rules multiply by it, and the load-time folds (merges, device
copies, placement slices) act on its blocks where they can do so exactly:

- a copy moves the arrays; a concat along the rows (merge_qkv, merge_up_gate) joins parts of
  one type and one K; a slice along the rows keeps blocks, one along K only at block bounds;
- anything else (mixed types, a cut inside a block, a reshape) dequantises its parts to the
  compute type first, so its value is the dequantised run's, bit for bit.

Products (`matmul`): one activation row runs the quant GEMV (gemv.py: Triton on CUDA or under
its interpreter, torch elsewhere), its tile chosen once per shape and kept in the session's
KernelChoices; more rows (a prefill) dequantise the weight to the activation type and multiply
(correct, and slower than a dequantised session, which does that once at load).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from backends.cuda.quant import gemv
from backends.cuda.quant.formats import SIZES
from backends.cuda.quant.repack import Packed, dequantize
from backends.cuda.triton_kernels.fused import usable
from graphir.ops import Op

GEMV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_kept(v: Any) -> bool:
    return isinstance(v, Packed)


def block_elements(qtype: str) -> int:
    """Weights per block along K (a Q4_K super-block carries the shared d, dmin)."""
    return SIZES[qtype][0]


def _parts(p: Packed) -> tuple[torch.Tensor | None, ...]:
    return p.qs, p.d, p.sub, p.qh  # Packed's arrays in its fields' order


def _map(p: Packed, fn: Any) -> Packed:
    return Packed(p.qtype, *(None if t is None else fn(t) for t in _parts(p)))


def to_device(p: Packed, device: torch.device) -> Packed:
    return _map(p, lambda t: t.to(device))


def dense(p: Packed, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the dequantised load gives it (formats' arithmetic, then the compute type)."""
    return dequantize(p).to(dtype)


def narrow(p: Packed, dim: int, start: int, stop: int) -> Packed | None:
    """Rows or columns [start, stop) of p as blocks (copied: a piece must not pin the whole), or
    None where a column cut falls inside a block."""
    n, k = p.shape
    if dim in (0, -2):
        return _map(p, lambda t: t[start:stop].clone())
    be = block_elements(p.qtype)
    if dim not in (1, -1) or start % be or stop % be or not 0 <= start < stop <= k:
        return None
    # every array's columns are proportional to K and a block bound is a bound of all of them
    return _map(p, lambda t: t[:, start * t.shape[1] // k:stop * t.shape[1] // k].contiguous())


def cat_rows(parts: Sequence[Packed]) -> Packed | None:
    """Parts joined along the rows (one type, one K), else None."""
    if len({(p.qtype, p.shape[1], p.qs.device) for p in parts}) != 1:
        return None
    joined = (None if ts[0] is None else torch.cat(ts, dim=0) for ts in zip(*map(_parts, parts)))
    return Packed(parts[0].qtype, *joined)


def assemble(node: Any, parts: Sequence[Packed]) -> Packed | None:
    """sources.assemble for kept parts: a leaf's sources joined on dim 0, then its slice."""
    p = cat_rows(parts) if len(parts) > 1 else parts[0]
    if p is not None and "slice_dim" in node.attr:
        a = node.attr
        p = narrow(p, int(a["slice_dim"]), int(a["start"]), int(a["stop"]))
    return p


def fold(node: Any, args: Sequence[Any], ctx: Any) -> Packed | None:
    """A load-time constant computed on kept inputs, or None: the caller dequantises instead."""
    if not all(is_kept(a) for a in args):
        return None
    if node.op == Op.COPY:
        return to_device(args[0], ctx.device(node))
    if node.op == Op.CONCAT and int(node.attr["dim"]) in (0, -2):
        return cat_rows(args)
    if node.op == Op.SLICE:
        start, stop = ctx.bind(node.attr["start"]), ctx.bind(node.attr["stop"])
        return narrow(args[0], int(node.attr["dim"]), start, stop)
    if node.op == Op.RESHAPE and tuple(ctx.shape(node)) == args[0].shape:
        return args[0]
    return None


def dequantised(args: Sequence[Any], dtype: torch.dtype) -> list[Any]:
    return [dense(a, dtype) if is_kept(a) else a for a in args]


def matmul(x: torch.Tensor, p: Packed, choices: Any) -> torch.Tensor:
    """x [..., K] @ W^T for a kept W [N, K]: the quant GEMV for one row, dequantise + matmul else."""
    n, k = p.shape
    lead = tuple(x.shape[:-1])
    if math.prod(lead) != 1 or x.dtype not in GEMV_DTYPES:
        return F.linear(x, dense(p, x.dtype))  # a prefill: correct, not fast (the blocks unpacked per call)
    x1 = x.reshape(1, k)
    key = (n, k, p.qtype, str(x.dtype).removeprefix("torch."), str(x.device))
    if key not in choices.quant_gemv:
        runs = usable(x1) and p.qs.device == x1.device
        choices.quant_gemv[key] = gemv.choose(x1, p)[0] if runs else None
    cfg = choices.quant_gemv[key]
    if cfg is None:  # no Triton here: the dequantised session's product, bit for bit
        return F.linear(x, dense(p, x.dtype))
    return gemv.gemv(x1, p, cfg).reshape(*lead, n)


def summary(weights: Mapping[str, Any]) -> dict[str, int]:
    """Kept weights by quant type ({} when none)."""
    out: dict[str, int] = {}
    for v in weights.values():
        if is_kept(v):
            out[v.qtype] = out.get(v.qtype, 0) + 1
    return dict(sorted(out.items()))


def kept_bytes(weights: Mapping[str, Any]) -> int:
    return sum(v.nbytes for v in weights.values() if is_kept(v))
