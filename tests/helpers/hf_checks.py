"""Checks against transformers shared by the per-family tests: a random checkpoint's logits,
whole prompt and split prompt + greedy decode (f32, 1e-4 relative), and the attention-size
strategy every family's configs start from."""

from __future__ import annotations

from pathlib import Path

import torch
from hypothesis import strategies as st

from backends.cuda.runtime.session import Session, greedy
from graphir.models.sources import load_source
from helpers.hf_oracle import hf_logits, hf_model, rel_err, save

TOL = 1e-4

@st.composite
def attention_sizes(draw: st.DrawFn, head_dims: tuple[int, ...] = (4, 6, 10)) -> dict:
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    # transformers' Llama insists on hidden % heads == 0; head_dim is drawn on its own
    return dict(vocab_size=draw(st.sampled_from([37, 50])), hidden_size=heads * draw(st.sampled_from([5, 7, 9])),
                intermediate_size=draw(st.sampled_from([19, 36])), num_hidden_layers=draw(st.integers(1, 3)),
                num_key_value_heads=kv, num_attention_heads=heads,
                head_dim=draw(st.sampled_from(head_dims)), tie_word_embeddings=draw(st.booleans()),
                rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])), max_position_embeddings=64)


def check_against_hf(arch: str, config: dict, path: Path, prompt: list[int], split: int, seed: int = 0) -> None:
    model = hf_model(arch, seed=seed, **config)
    save(model, path)
    source = load_source(path)
    whole, generated = greedy(Session(source, None, "cpu", 32), prompt, 4)
    ref = hf_logits(model, prompt + generated)
    assert rel_err(whole, ref) < TOL, f"{arch} {config}"
    s = Session(source, None, "cpu", 32)
    parts = [s.prefill(prompt[:split]), s.prefill(prompt[split:]), s.decode(generated)]
    assert rel_err(torch.cat(parts), ref) < TOL, f"{arch} split at {split}: {config}"
