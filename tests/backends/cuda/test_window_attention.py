"""Sliding-window and sink attention's fast forms (backends/cuda/rules/window_attention.py, the
window and sinks of decode_attention.py) against the reference kernel.

The split decode kernel runs on a GPU or under Triton's interpreter; the flash prefill form
needs CUDA. Rows the window hides hold NaN, rows past the position garbage: neither may leak.
"""

from __future__ import annotations

import pytest
import torch

from backends.cuda.triton_kernels import decode_attention, fused
from backends.cuda.rules import window_attention
from backends.cuda.rules.fastpath import attention as fast_attention
from backends.cuda.runtime.interp import ExecContext
from backends.cuda.reference.kernels import KERNELS
from graphir.builder import Builder
from graphir.ops import Op
from graphir.spec import TensorSpec
from helpers.hf_oracle import patch_triton_interpreter, rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda:0" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or (fused.INTERPRET and fused.triton is not None)),
                                reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
if not CUDA:
    patch_triton_interpreter()


def _graph(T: int, S: int, hq: int, hkv: int, d: int, window: int | None, sinks: bool):
    b = Builder()
    q = b.leaf(Op.INPUT, "q", TensorSpec((T, hq, d), "f32"), role="q")
    k = b.leaf(Op.INPUT, "k", TensorSpec((S, hkv, d), "f32"), role="k")
    v = b.leaf(Op.INPUT, "v", TensorSpec((S, hkv, d), "f32"), role="v")
    extra = (b.leaf(Op.INPUT, "s", TensorSpec((hq,), "f32"), role="sinks"),) if sinks else ()
    b.emit(Op.ATTENTION, "a", q, k, v, *extra, scale=d ** -0.5, window=window)
    return b.graph()


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEV, dtype)


def _reference(g, args: list[torch.Tensor]) -> torch.Tensor:
    ctx = ExecContext(g, {}, {}, {}, {}, "cpu")  # the graph: attention reads its inputs' cache types
    return KERNELS[Op.ATTENTION](g["a"], [x.float().cpu() for x in args], ctx)


@pytest.mark.parametrize("hq,hkv,d,S,pos,window,sinks", [
    (8, 2, 64, 300, 299, 128, True),     # gpt-oss shape: window 128, sinks
    (8, 2, 64, 300, 40, 128, True),      # the window still wider than the filled cache
    (4, 2, 16, 96, 50, 7, False),        # a window shorter than one block
    (16, 8, 128, 1024, 1000, 256, False),  # Gemma-3-like sliding layer
    (6, 2, 32, 700, 333, None, True),    # sinks on a full layer
])
def test_decode_window_and_sinks(hq: int, hkv: int, d: int, S: int, pos: int, window: int | None,
                                 sinks: bool) -> None:
    """Bucket mode, one bf16 query at `pos`: the split kernel started at the window, the sinks
    in its combine, against the reference over the valid rows."""
    g = _graph(1, pos + 1, hq, hkv, d, window, sinks)
    q, k, v = _rand(1, hq, d, seed=0), _rand(S, hkv, d, seed=1), _rand(S, hkv, d, seed=2)
    s = _rand(hq, seed=3) * 2 if sinks else None
    want = _reference(g, [q, k[:pos + 1], v[:pos + 1]] + ([s] if sinks else []))
    k[pos + 1:], v[pos + 1:] = 1e4, float("nan")  # rows not yet written
    if window is not None and pos - window + 1 > 0:
        k[:pos - window + 1], v[:pos - window + 1] = float("nan"), float("nan")  # rows the window hides
    got = decode_attention.decode_attention(q, k, v, torch.tensor([pos], device=DEV), d ** -0.5, window=window,
                                            sinks=s)
    assert got.dtype == torch.bfloat16 and got.shape == (1, hq, d)
    assert rel_err(got.float().cpu(), want) < (2e-2 if CUDA else 4e-2)


@needs_cuda
@pytest.mark.parametrize("T,S,window,sinks,loud", [(1, 500, 128, True, 1), (64, 64, 16, True, 1),
                                                   (200, 1000, 128, False, 1), (300, 900, None, True, 1),
                                                   (33, 2000, 1, True, 1), (256, 1024, 100, False, 12)])
def test_prefill_window_and_sinks(T: int, S: int, window: int | None, sinks: bool, loud: float) -> None:
    """The flash form with its left window and the sink rescale against the reference, through
    the CUDA rule (which proves it once on its first call and records the verdict). `loud`
    scales the queries: logits as large as an unscaled attention's (Gemma) must not fail the
    proof because the 16-bit reference rounds its scores."""
    hq, hkv, d = 8, 2, 64
    g = _graph(T, S, hq, hkv, d, window, sinks)
    args = [_rand(T, hq, d, seed=0) * loud, _rand(S, hkv, d, seed=1), _rand(S, hkv, d, seed=2)]
    args += [_rand(hq, seed=3) * 2] if sinks else []
    want = _reference(g, args)
    ctx = ExecContext(g, {}, {}, {}, {}, DEV)
    got = fast_attention(g["a"], args, ctx)
    assert ctx.choices.flash_window is True  # the flash form ran and matched on its first call
    assert rel_err(got.float().cpu(), want) < 2e-2
    direct = window_attention.flash(*args[:3], d ** -0.5, window, args[3].to(torch.bfloat16) if sinks else None)
    assert rel_err(direct.float().cpu(), want) < 2e-2


@needs_cuda
def test_bucket_decode_through_the_rule() -> None:
    """The captured decode step's route: bucket mode, a device-side position, window and sinks."""
    hq, hkv, d, S, pos, W = 8, 2, 64, 512, 400, 128
    g = _graph(1, S, hq, hkv, d, W, True)
    q, k, v, s = _rand(1, hq, d, seed=0), _rand(S, hkv, d, seed=1), _rand(S, hkv, d, seed=2), _rand(hq, seed=3)
    ctx = ExecContext(g, {}, {}, {}, {}, DEV, bucket=S, kvpos={DEV: torch.tensor([pos], device=DEV)})
    got = fast_attention(g["a"], [q, k, v, s], ctx)
    gv = _graph(1, pos + 1, hq, hkv, d, W, True)
    want = _reference(gv, [q, k[:pos + 1], v[:pos + 1], s])
    assert rel_err(got.float().cpu(), want) < 2e-2
