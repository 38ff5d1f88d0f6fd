"""IQ4_XS kept in blocks (backends/cuda/quant/iq4_xs.py): the repack against gguf's bytes and
dequantisation bit for bit, and its GEMV (byte permutes; emulated under Triton's interpreter)
against dequantise x f32 matmul. The GEMV runs on a GPU or under TRITON_INTERPRET=1, else skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from backends.cuda.quant import formats, iq4_xs
from backends.cuda.triton_kernels import fused
from helpers.hf_oracle import patch_triton_interpreter

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not (CUDA or (fused.INTERPRET and fused.triton is not None)),
                                  reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")
if fused.INTERPRET:
    patch_triton_interpreter()


def blocks(rows: int, k: int, seed: int) -> np.ndarray:
    """uint8 [rows, k/256 * 136]: random bytes with finite f16 d of either sign."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, k // 256, 136), dtype=np.uint8)
    d = (rng.standard_normal((rows, k // 256)) * 2.0 ** rng.integers(-14, -2, (rows, k // 256))).astype(np.float16)
    b[..., 0:2] = d.view(np.uint8).reshape(rows, k // 256, 2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("seed", range(4))
def test_repack_keeps_every_bit_and_dequantises_as_gguf(seed: int) -> None:
    raw = blocks(3 + seed, 256 * (1 + seed), seed)
    p = iq4_xs.repack(torch.from_numpy(raw))
    assert p.qs.dtype == torch.int32 and p.qs.shape == (raw.shape[0], raw.shape[1] // 136 * 32)
    assert torch.equal(iq4_xs.unpack(p), torch.from_numpy(raw))
    want = gguf_dequantize(raw, GGMLQuantizationType.IQ4_XS).astype(np.float32)
    got = iq4_xs.dequantize(p)
    assert torch.equal(got.view(torch.int32), torch.from_numpy(want).view(torch.int32))
    assert torch.equal(got, formats.dequantize(torch.from_numpy(raw), "IQ4_XS"))


def test_the_code_book_words_hold_the_book_plus_128() -> None:
    words = np.array([iq4_xs.T0, iq4_xs.T1, iq4_xs.T2, iq4_xs.T3], dtype=np.int64) & 0xFFFFFFFF
    book = np.array(words, dtype="<u4").view(np.uint8).astype(int) - 128
    assert book.tolist() == list(formats.KVALUES)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,cfg", [(37, 256, (8, 128, 4, 1)), (5, 1280, (4, 64, 4, 4)),
                                     (64, 1024, (8, 32, 4, 1)), (1, 512, (16, 64, 4, 1))])
def test_gemv_matches_dequantised_matmul(dtype: torch.dtype, n: int, k: int, cfg: tuple) -> None:
    raw = torch.from_numpy(blocks(n, k, n + k))
    p = iq4_xs.repack(raw.to(DEV))
    x = torch.randn((1, k), generator=torch.Generator().manual_seed(k)).to(DEV, dtype)
    got = iq4_xs.gemv(x, p, cfg)
    want = x.float() @ iq4_xs.dequantize(p).T
    assert got.shape == (1, n) and got.dtype == dtype
    eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # one ulp of the output (see test_quant_kernels)
    bound = eps * want.abs() + 1e-4 * float(want.abs().max())
    assert bool(((got.float() - want).abs() <= bound).all()), float((got.float() - want).abs().max())


def test_without_triton_the_gemv_is_the_reference() -> None:
    raw = torch.from_numpy(blocks(4, 512, 1))
    p = iq4_xs.repack(raw)
    x = torch.randn(1, 512, dtype=torch.float32)
    if fused.usable(x):
        pytest.skip("Triton runs here: the kernel path is tested above")
    assert torch.equal(iq4_xs.gemv(x, p), iq4_xs.reference(x, p))
