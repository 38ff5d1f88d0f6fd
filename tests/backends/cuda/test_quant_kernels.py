"""GGUF block formats, their repack and the quant GEMV (backends/cuda/quant) against oracles.

formats.dequantize is checked bit for bit against gguf.quants.dequantize (numpy) on blocks that
gguf.quants.quantize wrote from random data, and on random bytes (every bit pattern of the
quants; finite random scales); the repack against formats and its own inverse. These run on the
CPU everywhere. The Triton GEMV runs on a GPU, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1), and skips otherwise; its oracle is the reference dequantisation times a
plain f32 torch matmul.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from backends.cuda.triton_kernels import fused
from backends.cuda.quant import formats, gemv, repack
from helpers.hf_oracle import patch_triton_interpreter

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not (CUDA or (fused.INTERPRET and fused.triton is not None)),
                                  reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")
DEV = "cuda:0" if CUDA else "cpu"
if not CUDA:
    patch_triton_interpreter()

ALL = tuple(formats.SIZES)
PACKED = tuple(repack.WORDS)
# the f16 fields of a block
SCALE_BYTES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
SEEDS = (3, 11, 2026)


def random_blocks(qtype: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, nbytes]: random bytes, the f16 scale fields set to finite values of either sign."""
    bs, size = formats.SIZES[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, k // bs, size), dtype=np.uint8)
    top = -3 if bs == 256 else 4  # the super-blocks' d is times a 6- or 8-bit scale: keep f16 outputs finite
    for off in SCALE_BYTES[qtype]:
        d = (rng.standard_normal((rows, k // bs)) * 2.0 ** rng.integers(-14, top, (rows, k // bs))).astype(np.float16)
        b[..., off:off + 2] = d.view(np.uint8).reshape(rows, k // bs, 2)
    return b.reshape(rows, -1)


def quantized(qtype: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """What gguf's quantiser writes for random weights (with zeros and outliers among them)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0
    w[-1, 5] = 3.0
    return gguf_quantize(w, GGMLQuantizationType[qtype])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def same_bits(got: torch.Tensor, want: np.ndarray) -> None:
    assert tuple(got.shape) == want.shape and got.dtype == torch.float32
    assert torch.equal(bits(got), bits(torch.from_numpy(np.ascontiguousarray(want))))


# ---- formats ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"))  # gguf quantises no others
@pytest.mark.parametrize("seed", SEEDS)
def test_dequantize_matches_gguf_on_its_quantised_blocks(qtype: str, seed: int) -> None:
    raw = quantized(qtype, 7, 256, seed)
    same_bits(formats.dequantize(torch.from_numpy(raw), qtype), gguf_dequantize(raw, GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("seed", SEEDS)
def test_dequantize_matches_gguf_on_random_blocks(qtype: str, seed: int) -> None:
    raw = random_blocks(qtype, 5, 512, seed=seed)
    same_bits(formats.dequantize(torch.from_numpy(raw), qtype), gguf_dequantize(raw, GGMLQuantizationType[qtype]))


def test_formats_sizes_are_ggufs() -> None:
    from gguf.constants import GGML_QUANT_SIZES

    assert {q: GGML_QUANT_SIZES[GGMLQuantizationType[q]] for q in formats.SIZES} == formats.SIZES


def test_bad_bytes_give_one_line_errors() -> None:
    with pytest.raises(formats.QuantFormatError, match="not whole 18-byte blocks"):
        formats.dequantize(torch.zeros(2, 20, dtype=torch.uint8), "Q4_0")
    with pytest.raises(formats.QuantFormatError, match="uint8"):
        formats.dequantize(torch.zeros(2, 18, dtype=torch.int8), "Q4_0")
    with pytest.raises(formats.QuantFormatError, match="IQ2_XXS"):
        formats.dequantize(torch.zeros(2, 18, dtype=torch.uint8), "IQ2_XXS")
    with pytest.raises(formats.QuantFormatError, match="no repacked layout for IQ4_NL"):
        repack.repack(torch.zeros(2, 18, dtype=torch.uint8), "IQ4_NL")


# ---- repack -----------------------------------------------------------------------------------

GGUF_QUANTISES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# (Q4|5)_K's 12 bytes of 6-bit scales per 256 read as 16; IQ4_XS's 6 bytes of 8 scales as 8 int16
EXTRA_BYTES = {"Q4_K": 4 * 2 * 6, "Q5_K": 4 * 2 * 6, "IQ4_XS": 10 * 2 * 6}
D_SHAPE = {"Q4_K": (6, 2, 2), "Q5_K": (6, 2, 2), "Q6_K": (6, 2), "Q4_1": (6, 16, 2), "IQ4_XS": (6, 2)}  # of 6 x 512 weights


@pytest.mark.parametrize("qtype", PACKED)
@pytest.mark.parametrize("source", ["gguf", *SEEDS])
def test_repack_keeps_every_bit(qtype: str, source: str | int) -> None:
    if source == "gguf" and qtype not in GGUF_QUANTISES:
        pytest.skip(f"gguf has no {qtype} quantiser")
    raw = torch.from_numpy(quantized(qtype, 6, 512) if source == "gguf" else random_blocks(qtype, 6, 512, seed=source))
    p = repack.repack(raw, qtype)
    words, _ = repack.WORDS[qtype]
    assert p.qs.dtype == torch.int32 and tuple(p.qs.shape) == (6, 16 * words) and p.shape == (6, 512)
    assert p.d.dtype == torch.float16 and tuple(p.d.shape) == D_SHAPE.get(qtype, (6, 16))
    assert p.nbytes == raw.numel() + EXTRA_BYTES.get(qtype, 0)  # nothing added but Q4_K's unpacked scales
    assert torch.equal(repack.unpack(p), raw)
    assert torch.equal(bits(repack.dequantize(p)), bits(formats.dequantize(raw, qtype)))


def test_the_iq4_xs_code_book_words_hold_the_book_plus_128() -> None:
    """The four words the GEMV's byte permutes read IQ4_XS's code book from (iq4_xs.py)."""
    from backends.cuda.quant import iq4_xs

    words = np.array([iq4_xs.T0, iq4_xs.T1, iq4_xs.T2, iq4_xs.T3], dtype=np.int64) & 0xFFFFFFFF
    book = np.array(words, dtype="<u4").view(np.uint8).astype(int) - 128
    assert book.tolist() == list(formats.KVALUES) and iq4_xs.BOOK == tuple(v + 128 for v in formats.KVALUES)


def test_repack_puts_field_j_of_word_w_at_the_documented_element() -> None:
    """Q4_0: nibble j of word w is element 4j + w; Q8_0: byte j of word 4c + v is element 16c + 4j + v (q + 128)."""
    q = torch.arange(32) % 16  # element e of the block holds e % 16
    raw = torch.cat((torch.tensor([0, 0x3C], dtype=torch.uint8), (q[:16] | (q[16:] << 4)).to(torch.uint8)))
    w = repack.repack(raw[None], "Q4_0").qs[0].tolist()  # 4 words
    assert all((w[i] >> (4 * j)) & 0xF == (4 * j + i) % 16 for i in range(4) for j in range(8))
    q8 = torch.arange(-16, 16, dtype=torch.int8)
    raw8 = torch.cat((torch.tensor([0, 0x3C], dtype=torch.uint8), q8.view(torch.uint8)))
    w8 = repack.repack(raw8[None], "Q8_0").qs[0].tolist()  # 8 words
    assert all(((w8[4 * c + v] >> (8 * j)) & 0xFF) - 128 == q8[16 * c + 4 * j + v]
               for c in range(2) for v in range(4) for j in range(4))


def test_q6_k_repack_puts_the_top_bits_next_to_their_nibbles() -> None:
    """Q6_K: nibble j of word w of unit u is element 32u + 4j + w's low 4 bits; bits 4j..4j+1
    (4j+2..4j+3) of qh word w of pair c are the top 2 bits of element 64c + 4j + w (+ 32);
    byte t of sub word c is scale 4c + t + 128."""
    v = (torch.arange(256) * 37 + 11) % 64  # element e's 6-bit value
    lo, hi = v & 0xF, v >> 4
    ql = torch.cat([lo[128 * h:128 * h + 64] | (lo[128 * h + 64:128 * h + 128] << 4) for h in range(2)])
    qh = torch.cat([sum(hi[128 * h + 32 * s:128 * h + 32 * s + 32] << (2 * s) for s in range(4)) for h in range(2)])
    sc = torch.arange(-8, 8, dtype=torch.int8) * 15
    raw = torch.cat((ql, qh, sc.view(torch.uint8).long(), torch.tensor([0, 0x3C]))).to(torch.uint8)
    p = repack.repack(raw[None], "Q6_K")
    w, h, s = p.qs[0].tolist(), p.qh[0].tolist(), p.sub[0].tolist()
    assert all((w[4 * u + i] >> (4 * j)) & 0xF == int(lo[32 * u + 4 * j + i]) for u in range(8) for i in range(4)
               for j in range(8))
    assert all((h[4 * c + i] >> (4 * j + 2 * b)) & 3 == int(hi[64 * c + 32 * b + 4 * j + i]) for c in range(4)
               for i in range(4) for j in range(8) for b in range(2))
    assert all((s[c] >> (8 * t)) & 0xFF == (int(sc[4 * c + t]) + 128) for c in range(4) for t in range(4))


# ---- the Triton GEMV --------------------------------------------------------------------------

def case(qtype: str, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, repack.Packed]:
    """x [1, K'] and a random weight [n, K'], K' = k rounded up to whole blocks (Q4_K: 256)."""
    bs = formats.SIZES[qtype][0]
    k = -(-k // bs) * bs
    raw = torch.from_numpy(random_blocks(qtype, n, k, seed=seed))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, k), generator=g).to(DEV, dtype)
    return x, repack.repack(raw.to(DEV), qtype)


def close(got: torch.Tensor, x: torch.Tensor, p: repack.Packed) -> None:
    """Against dequantise x f32 matmul: the kernel's f32 sums differ only in order, then one rounding."""
    want = x.float() @ repack.dequantize(p).T  # [1, N] f32
    assert got.shape == want.shape and got.dtype == x.dtype
    # one ulp of the output type: Triton's interpreter truncates f32 -> bf16 (a GPU rounds to nearest)
    eps = 2.0 ** -7 if x.dtype == torch.bfloat16 else 2.0 ** -10
    bound = eps * want.abs() + 1e-4 * float(want.abs().max())
    assert bool(((got.float() - want).abs() <= bound).all()), float((got.float() - want).abs().max())


@needs_triton
@pytest.mark.parametrize("qtype", PACKED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(37, 96), (5, 4128), (300, 1024), (1, 2080), (256, 2048)])  # last: no masks
def test_gemv_matches_dequantised_matmul(qtype: str, dtype: torch.dtype, n: int, k: int) -> None:
    x, p = case(qtype, n, k, dtype, seed=n + k)
    close(gemv.gemv(x, p), x, p)


@needs_triton
@pytest.mark.parametrize("qtype", PACKED)
@pytest.mark.parametrize("cfg", gemv.CONFIGS)
def test_every_config_matches(qtype: str, cfg: gemv.Config) -> None:
    x, p = case(qtype, 19, 8224, torch.bfloat16, seed=7)  # 257 blocks: a partial tile in every split
    close(gemv.gemv(x, p, cfg), x, p)


@needs_triton
def test_choose_returns_a_config_it_timed() -> None:
    x, p = case("Q4_0", 64, 1024, torch.bfloat16)
    cfg, times = gemv.choose(x, p, gemv.CONFIGS[:3])
    if CUDA:
        assert cfg in times and set(times) <= set(gemv.CONFIGS[:3]) and cfg == min(times, key=times.get)
    else:  # the interpreter's times mean nothing: no timing, the default
        assert (cfg, times) == (gemv.DEFAULT, {})


def test_fallback_without_triton_is_the_reference() -> None:
    """On the CPU without the interpreter gemv is dequantise + matmul; the oracle still holds."""
    x, p = case("Q8_0", 9, 256, torch.float16)
    x, p = x.cpu(), repack.Packed(p.qtype, p.qs.cpu(), p.d.cpu())
    close(gemv.reference(x, p), x, p)
    if not fused.INTERPRET:
        assert torch.equal(gemv.gemv(x, p), gemv.reference(x, p))


def test_gemv_rejects_bad_x() -> None:
    _, p = case("Q4_0", 4, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=r"x bf16/f16/f32 \[1, 64\]"):
        gemv.gemv(torch.zeros(1, 32, dtype=torch.bfloat16, device=p.qs.device), p)
    with pytest.raises(ValueError, match="float64"):
        gemv.gemv(torch.zeros(1, 64, dtype=torch.float64, device=p.qs.device), p)
