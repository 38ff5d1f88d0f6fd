"""Sliding-window and sink attention on CUDA (gpt-oss; Gemma's sliding layers).

The reference (attention.py) scores every query against the whole cache and masks what the
window hides: a windowed layer then costs what a full one costs, and more, since the mask is
materialised ([hkv, g, T, S] scores). Here a windowed layer reads its window only:

- prefill (and eager decode): the flash kernel with a left window of W-1 keys and causal
  alignment at the bottom right (query i at S-T+i). Sinks are one extra softmax logit per
  query head without a value; flash returns each row's log-sum-exp of the scores, and the
  sink joins the normaliser as a rescale of the output:
  out * Σe^s / (Σe^s + e^sink) = out * sigmoid(lse - sink).
- decode in bucket mode (a captured step): decode_attention's split kernel, started at the
  window's first row, with the sinks in its combine.

The flash form is proven once per session against the reference on its first call
(`KernelChoices.flash_window`): a torch build whose flash kernel ignores the window, or has
none, falls back to the reference from then on rather than computing something else.
"""

from __future__ import annotations

from typing import Sequence

import torch

from backends.cuda.reference import attention as ref_attn
from backends.cuda.triton_kernels import decode_attention
from backends.cuda.runtime.interp import ExecContext
from graphir.graph import Node

FLASH_MAX_HEAD_DIM = 256  # the flash kernel's largest head
PROOF_ROWS = 64  # queries the first-use proof recomputes in f32


def attention(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """A window / sink attention node on CUDA in its fast form, else the reference."""
    q, k, v = args[:3]  # q [T,hq,d], k [S,hkv,d], v [S,hkv,dv]
    sinks = args[3] if len(args) > 3 else None  # [hq]
    window = node.attr.get("window")
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return ref_attn.attention(node, args, ctx)
    k, v = ref_attn.cache_floats(node, args, ctx, q.dtype)
    scale = float(node.attr["scale"])
    sink = None if sinks is None else sinks.to(q.device, q.dtype).contiguous()  # the reference rounds it so
    if ctx.bucket is not None:
        if q.shape[0] == 1 and decode_attention.usable_for(q, k, v):
            pos = ctx.kvpos[ctx.device_name(node)]
            return decode_attention.decode_attention(q, k, v, pos, scale, window=window, sinks=sink)
        return ref_attn.attention(node, args, ctx)
    if ctx.choices.flash_window is False or max(q.shape[-1], v.shape[-1]) > FLASH_MAX_HEAD_DIM \
            or q.shape[-1] != v.shape[-1]:
        return ref_attn.attention(node, args, ctx)
    try:
        out = flash(q, k, v, scale, window, sink)
    except RuntimeError as e:  # no flash kernel for this GPU, type or head: decided once
        ctx.choices.flash_window, ctx.choices.flash_window_note = False, f"error: {str(e).splitlines()[0][:120]}"
        return ref_attn.attention(node, args, ctx)
    if ctx.choices.flash_window is None:
        # first use: prove it once against the reference computed in f32 from the same inputs.
        # Not against the 16-bit reference: that rounds the scores to the activation type,
        # which at large logits (Gemma's unscaled attention) moves the softmax by more than
        # the output's own rounding, while flash keeps them in f32.
        # The last PROOF_ROWS queries only: their scores over the whole cache stay small in f32.
        n = min(q.shape[0], PROOF_ROWS)
        f32 = [q[-n:].float(), k.float(), v.float()] + ([] if sink is None else [sink.float()])
        ref = ref_attn.attention(node, f32, ctx)  # [n,hq,dv]
        err = float((out[-n:].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        ctx.choices.flash_window = err <= 2e-2
        ctx.choices.flash_window_note = f"max error {err:.1e} of the largest output on first use"
        if not ctx.choices.flash_window:
            return ref_attn.attention(node, args, ctx)
    return out


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
          sink: torch.Tensor | None) -> torch.Tensor:
    """q [T,hq,d] at positions S-T.., k/v [S,hkv,d] (GQA native) -> [T,hq,d] in q's type."""
    T, S = q.shape[0], k.shape[0]
    left = int(window) - 1 if window is not None else None  # key j visible to query p iff p-W < j <= p
    out, lse = torch.ops.aten._flash_attention_forward(
        q[None], k[None], v[None], None, None, T, S, 0.0, True, False, scale=scale,
        window_size_left=left, window_size_right=0 if left is not None else None)[:2]  # [1,T,hq,d], [1,hq,T]
    out = out[0]
    if sink is None:
        return out
    keep = torch.sigmoid(lse[0, :, :T] - sink.float()[:, None])  # [hq,T]: Σe^s / (Σe^s + e^sink)
    return (out.float() * keep.t()[:, :, None]).to(q.dtype)
