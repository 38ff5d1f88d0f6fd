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
              "qwen3_next": "Qwen3NextConfig", "seed_oss": "SeedOssConfig", "ministral3": "Ministral3Config",
              "ernie4_5_moe": "Ernie4_5_MoeConfig", "hunyuan_v1_moe": "HunYuanMoEV1Config",
              "glm4_moe": "Glm4MoeConfig", "minimax_m2": "MiniMaxM2Config", "deepseek_v3": "DeepseekV3Config",
              "gpt_oss": "GptOssConfig", "gemma3": "Gemma3TextConfig",
              "qwen3_5": "Qwen3_5TextConfig", "qwen3_5_moe": "Qwen3_5MoeTextConfig",
              "gemma4": "Gemma4TextConfig"}


def hf_model(arch: str, seed: int = 0, **config: Any) -> Any:
    """A transformers causal LM of `arch` with `config`, weights drawn from `seed`."""
    import transformers

    cfg = getattr(transformers, HF_CONFIGS[arch])(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager").eval()
    perturb(model, zero_centred=arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "gemma3"), seed=seed)
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
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # sigmoid routers' selection bias: a buffer, saved
            b.copy_(0.1 * randn(b))
        elif name.endswith("layer_scalar"):  # Gemma 4's per-layer output scale: a buffer, saved
            b.copy_(1.0 + 0.1 * randn(b))


def save(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(str(path), **kwargs)
    return Path(path)


@torch.no_grad()
def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] f32 of the full sequence in one forward (no cache)."""
    return model(torch.tensor([ids])).logits[0].to(torch.float32)


def check_logits(arch: str, config: dict[str, Any], path: Path, prompt: list[int], split: int, seed: int = 0,
                 transform: Any = None, tol: float = 1e-4) -> None:
    """A random checkpoint of `arch` saved at `path`: the prompt and 4 greedy tokens through
    Session (whole, then as two prefills and a decode), every logit row against transformers'
    forward over the full sequence, within `tol` relative."""
    from backends.cuda.runtime.session import Session, greedy
    from graphir.models.sources import load_source

    model = hf_model(arch, seed=seed, **config)
    src = load_source(save(model, path))
    whole, gen = greedy(Session(src, None, "cpu", 32, transform=transform), prompt, 4)
    ref = hf_logits(model, prompt + gen)
    assert rel_err(whole, ref) < tol, config
    s = Session(src, None, "cpu", 32, transform=transform)
    parts = [s.prefill(prompt[:split]), s.prefill(prompt[split:]), s.decode(gen)]
    assert rel_err(torch.cat(parts), ref) < tol, (config, split)


def hf_params(d: dict[str, Any]) -> int:
    """transformers' parameter count for config dict `d`, built on the meta device."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(**d)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg).num_parameters()


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


def hf_checkpoint_numel(config: dict[str, Any]) -> int:
    """Elements of every tensor a transformers model of this config.json saves (built on the meta
    device): its parameters plus its persistent buffers (sigmoid routers' e_score_correction_bias)."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    saved = set(model.state_dict())
    return model.num_parameters() + sum(b.numel() for name, b in model.named_buffers() if name in saved)


def check_low_precision(model: Any, ckpt: Path, prompt: list[int]) -> None:
    """bf16 / f16 runs of a saved checkpoint stay as close to graphir's f32 run as transformers'
    own bf16 / f16 runs do (a model-dependent tolerance measured on the oracle, floor 3%)."""
    from backends.cuda.runtime.session import Session, greedy
    from graphir.models.sources import load_source

    src = load_source(ckpt)
    ref, gen = greedy(Session(src, None, "cpu", 16, dtype="f32"), prompt, 3)
    for dt, tdt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        hf_err = rel_err(hf_logits(model.to(tdt), prompt + gen), ref)
        s = Session(src, None, "cpu", 16, dtype=dt)
        got = torch.cat([s.prefill(prompt), s.decode(gen)])
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert rel_err(got, ref) < max(0.03, 1.5 * hf_err), (dt, hf_err)
