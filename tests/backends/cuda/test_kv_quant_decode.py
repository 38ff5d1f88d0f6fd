"""The split decode-attention kernel reading a q8_0 / q4_0 cache as its bytes
(triton_kernels/decode_attention.py) against the same kernel on the dequantised cache (the same
values: equal bit for bit) and against the reference attention. On a GPU or under Triton's
interpreter (TRITON_INTERPRET=1); skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from backends.cuda.reference import kv_quant
from backends.cuda.triton_kernels import decode_attention, fused
from helpers.hf_oracle import patch_triton_interpreter, rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda:0" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or (fused.INTERPRET and fused.triton is not None)),
                                reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")
if not CUDA:
    patch_triton_interpreter()


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """f32 softmax attention of one query over rows 0..pos, GQA heads repeated."""
    g = q.shape[1] // k.shape[1]
    kk = k[:pos + 1].float().repeat_interleave(g, dim=1)  # [S,hq,d]
    vv = v[:pos + 1].float().repeat_interleave(g, dim=1)
    s = torch.einsum("hd,shd->hs", q[0].float(), kk) * scale
    return torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), vv)[None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache", ["q8_0", "q4_0"])
@pytest.mark.parametrize("which", ["kv", "k", "v"])
@pytest.mark.parametrize("hq,hkv,d,S,pos", [(8, 2, 64, 300, 299), (4, 4, 128, 96, 40), (16, 8, 128, 700, 513)])
def test_block_cache_reads_as_its_dequantised_values(dtype: torch.dtype, cache: str, which: str, hq: int, hkv: int,
                                                     d: int, S: int, pos: int) -> None:
    g = torch.Generator().manual_seed(hq + d + S)
    q = torch.randn((1, hq, d), generator=g).to(DEV, dtype)
    kf, vf = (torch.randn((S, hkv, d), generator=g).to(DEV) for _ in range(2))
    raw = {"k": kv_quant.quantize(kf, cache), "v": kv_quant.quantize(vf, cache)}
    deq = {n: kv_quant.dequantize(r, cache, dtype) for n, r in raw.items()}
    k, v = (raw[n] if n in which else deq[n] for n in ("k", "v"))
    kc, vc = (cache if n in which else None for n in ("k", "v"))
    assert decode_attention.usable_for(q, k, v, kc, vc)
    at = torch.tensor([pos], device=DEV)
    got = decode_attention.decode_attention(q, k, v, at, d ** -0.5, k_cache=kc, v_cache=vc)
    same = decode_attention.decode_attention(q, deq["k"], deq["v"], at, d ** -0.5)
    assert got.dtype == dtype and got.shape == (1, hq, d)
    if CUDA or dtype == torch.float16:  # the kernel saw exactly the reference's dequantised values
        assert torch.equal(got, same)
    else:  # Triton's interpreter truncates f32 -> bf16 where a GPU (and torch) round to nearest
        assert rel_err(got.float().cpu(), same.float().cpu()) < 2e-2
    assert rel_err(got.float().cpu(), _reference(q, deq["k"], deq["v"], pos, d ** -0.5).cpu()) < 4e-2


def test_caches_it_cannot_read_are_refused() -> None:
    q = torch.zeros((1, 4, 64), dtype=torch.bfloat16, device=DEV)
    raw = torch.zeros((8, 2, 68), dtype=torch.uint8, device=DEV)  # q8_0 bytes of d = 64
    assert decode_attention.head_dim(raw, "q8_0") == 64
    assert not decode_attention.usable_for(q, raw, raw, "q5_0", "q8_0")  # not a kernel's type
    assert not decode_attention.usable_for(q, raw, raw, None, None)  # bytes without a type
    assert not decode_attention.usable_for(q, raw[..., :34], raw, "q8_0", "q8_0")  # d 32 != q's 64


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_decode_step_reads_the_blocks_in_the_kernel(tmp_path, monkeypatch, name: str) -> None:
    """A 16-bit session's decode step (run eagerly here, captured on a GPU) takes the kernel on
    the cache's bytes; its rows equal the session's own decode, which dequantises the cache."""
    from backends.cuda.capture.decode_step import DecodeStep
    from backends.cuda.rules.rule_table import CUDA_KERNELS
    from backends.cuda.runtime.session import Session
    from graphir.models.sources import load_source
    from helpers.hf_oracle import hf_model, save

    tiny = dict(vocab_size=64, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32)
    src = load_source(save(hf_model("qwen3", seed=2, **tiny), tmp_path / "m"))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    s = Session(src, None, "cpu" if not CUDA else DEV, 64, dtype="f16", kv_type=name, kernels=CUDA_KERNELS)
    s.prefill(prompt)
    want = s.decode([7, 8]).float()
    s.reset()
    s.prefill(prompt)
    calls = []
    real = decode_attention.decode_attention

    def counted(*a, **kw):  # noqa: ANN002, ANN003
        calls.append((kw.get("k_cache"), kw.get("v_cache")))
        return real(*a, **kw)

    monkeypatch.setattr(decode_attention, "decode_attention", counted)  # the real kernel, its calls recorded
    step = DecodeStep(s, 32, capture=False)
    rows = []
    for t in (7, 8):
        step.step(t)
        rows.append(step.logits.float().clone())
    assert calls and set(calls) == {(name, name)}  # every layer's attention read the blocks
    assert rel_err(torch.cat(rows), want) < 2e-3
