"""DeepSeek-V3's attention weights as the absorbed graph reads them (graphir/models/deepseek_v3.py).

- `kv_b` [heads*(nope+v), kv_lora_rank] splits per head into attn_k_b [heads, kv_lora_rank,
  nope] (transposed: it maps a nope query into the latent space) and attn_v_b [heads, v,
  kv_lora_rank] (llama.cpp's converter stores the same two tensors).
- Rotary rows stored as interleaved pairs (rope_interleave, transformers' default for these
  checkpoints) are reordered evens-then-odds, so rotate-half RoPE turns the same pairs; q·k is
  unchanged because q and k are reordered alike.
"""

from __future__ import annotations

import torch

from backends.cuda.weights.sources import WeightInfo
from graphir.models import ModelConfig

TRANSFORMS = ("mla_k_b", "mla_v_b", "mla_q", "mla_kv_a")


def _deinterleave(t: torch.Tensor, start: int, dr: int) -> torch.Tensor:
    """Rows [start, start+dr) of t's last-but-one dim reordered x0,x2,...,x1,x3,..."""
    idx = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)]) + start
    out = t.clone()
    out[..., start:start + dr, :] = t[..., idx, :]
    return out


def mla_weight(kind: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    nh, dn, dv, dr, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.head_dim, cfg.kv_lora_rank
    if kind in ("mla_k_b", "mla_v_b"):
        per = t.reshape(nh, dn + dv, r)  # [heads, nope+v, r]
        return per[:, :dn].transpose(1, 2).contiguous() if kind == "mla_k_b" else per[:, dn:].contiguous()
    if not cfg.rope_interleave:
        return t
    if kind == "mla_q":  # [heads*(nope+rope), in]: the rope rows of each head
        return _deinterleave(t.reshape(nh, dn + dr, -1), dn, dr).reshape(t.shape)
    return _deinterleave(t, r, dr)  # mla_kv_a [r+rope, H]: the last rope rows


# GGUF (llama.cpp's deepseek2 layout): attn_k_b / attn_v_b, 3-D as here or 2-D [heads*rows, cols]
# as ik_llama.cpp's converter writes them; rotary rows interleaved as in the checkpoint
_FROM_GGUF = {"attn_q_b.weight": "mla_q", "attn_q.weight": "mla_q", "attn_kv_a_mqa.weight": "mla_kv_a"}


def mla_from_gguf(info: WeightInfo, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if info.name.endswith(("attn_k_b.weight", "attn_v_b.weight")) and w.dim() == 2 and w.numel() == \
            info.shape[0] * info.shape[1] * info.shape[2]:
        return w.reshape(info.shape)
    kind = next((k for suffix, k in _FROM_GGUF.items() if info.name.endswith(suffix)), None)
    return mla_weight(kind, w, cfg) if kind and tuple(w.shape) == info.shape else w


def interleave(kind: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of the rotary reordering: graph rows back to the checkpoint's (and GGUF's) order."""
    dr = cfg.head_dim
    inv = torch.argsort(torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)]))
    if kind == "mla_q":
        per = t.reshape(cfg.n_head, cfg.qk_nope_head_dim + dr, -1).clone()
        per[:, cfg.qk_nope_head_dim:] = per[:, cfg.qk_nope_head_dim + inv]
        return per.reshape(t.shape)
    out = t.clone()
    out[cfg.kv_lora_rank:] = t[cfg.kv_lora_rank + inv]
    return out
