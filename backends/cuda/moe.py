"""Mixture-of-experts kernels: router top-k, routing weights, expert matmul, weighted sum.

Numerics follow transformers' Qwen3 MoE router: softmax of the router logits in f32, torch.topk
on the probabilities (so ties resolve as torch.topk does), weights renormalised over the
chosen k when `norm`; the weights are cast to the activation type before they scale the
expert outputs, as transformers does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from backends.cuda.interp import ExecContext
from graphir.graph import Node


def moe_topk(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    (logits,) = args  # [T,E]
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    return torch.topk(probs, int(node.attr["k"]), dim=-1).indices.to(torch.int32)  # [T,k]


def moe_weights(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    logits, ids = args  # [T,E], [T,k]
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    w = probs.gather(1, ids.long())  # [T,k] f32
    if node.attr.get("norm"):
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def moe_matmul(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """x [T,H] (same row for every slot) or [T,k,H], w [E,N,H], ids [T,k] -> [T,k,N].
    One matmul per expert actually chosen (never a loop over all E experts)."""
    x, w, ids = args
    T, k = ids.shape
    H = w.shape[2]
    xs = (x[:, None, :].expand(T, k, H) if x.dim() == 2 else x).reshape(T * k, H)
    flat = ids.reshape(-1).long()
    out = xs.new_empty(T * k, w.shape[1])
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    start = 0
    for e, c in zip(experts.tolist(), counts.tolist()):
        rows = order[start:start + c]
        out[rows] = F.linear(xs[rows], w[e].to(xs.dtype))
        start += c
    return out.view(T, k, -1)


def moe_sum(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    y, w = args  # [T,k,H], [T,k] f32
    return (y * w.to(y.dtype)[..., None]).sum(dim=1)  # [T,H]
