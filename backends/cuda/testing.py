"""Helpers for tests that compare the executor with transformers (the oracle).

Tiny random transformers models are re-initialised so that every parameter matters (norm
weights off their neutral value, matrices at unit gain) and saved with `save_pretrained`,
exactly as a user's checkpoint would be. transformers is imported only here, never by the
backend itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

HF_CONFIGS = {"llama": "LlamaConfig", "qwen3": "Qwen3Config", "qwen3_moe": "Qwen3MoeConfig",
              "qwen3_next": "Qwen3NextConfig", "qwen3_5": "Qwen3_5TextConfig", "qwen3_5_moe": "Qwen3_5MoeTextConfig"}


def hf_model(arch: str, seed: int = 0, **config: Any) -> Any:
    """A transformers causal LM of `arch` with `config`, weights drawn from `seed`."""
    import transformers

    cfg = getattr(transformers, HF_CONFIGS[arch])(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager").eval()
    perturb(model, zero_centred=arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe"), seed=seed)
    return model


@torch.no_grad()
def perturb(model: Any, zero_centred: bool, seed: int = 0) -> None:
    """Re-draw every parameter at a scale where all of them change the logits."""
    gen = torch.Generator().manual_seed(seed)

    def randn(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen).to(p.dtype)

    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.rand(p.shape, generator=gen))  # decays -exp(A) in (-e, -1)
        elif p.dim() == 1 and "norm" in name:
            neutral = 0.0 if zero_centred and "linear_attn.norm" not in name else 1.0
            p.copy_(neutral + 0.1 * randn(p))
        elif p.dim() >= 2:
            p.copy_(randn(p) / math.sqrt(p.shape[-1]))
        else:
            p.copy_(0.1 * randn(p))  # biases, dt_bias


def save(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(str(path), **kwargs)
    return Path(path)


@torch.no_grad()
def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] f32 of the full sequence in one forward (no cache)."""
    return model(torch.tensor([ids])).logits[0].to(torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads. Tiny test models are latency bound: on small CI machines
    waking a second thread for every tiny op costs milliseconds, one thread costs microseconds."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def patch_triton_interpreter() -> None:
    """Triton's CPU interpreter turns loop bounds into Python ints with int(array), which
    numpy 2 refuses for 1-element arrays; read the element instead. Tests only."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    if getattr(interp, "_graphir_patched", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._graphir_patched = True
