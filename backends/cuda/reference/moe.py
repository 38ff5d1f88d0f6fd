"""Mixture-of-experts kernels: router top-k, routing weights, expert matmul, weighted sum.

Numerics follow transformers' Qwen3 MoE router: softmax of the router logits in f32, torch.topk
on the probabilities (so ties resolve as torch.topk does), weights renormalised over the
chosen k when `norm`; the weights are cast to the activation type before they scale the
expert outputs, as transformers does.

A shared expert folded into the routed ones (passes/shared_expert.py, attr `shared` = m)
adds m slots after the k routed ones: moe_topk's ids E..E+m-1, and as their weights the
sigmoid of the shared gate logit, in the gate's type as the unfolded graph computes it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from backends.cuda.runtime.interp import ExecContext
from graphir.graph import Node


def shared_ids(T: int, E: int, m: int, device: torch.device) -> torch.Tensor:
    """i32 [T,m]: the ids E..E+m-1 of a shared expert folded into m extra expert slots."""
    return torch.arange(E, E + m, dtype=torch.int32, device=device).expand(T, m)


def moe_topk(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    (logits,) = args  # [T,E]
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    ids = torch.topk(probs, int(node.attr["k"]), dim=-1).indices.to(torch.int32)  # [T,k]
    m = int(node.attr.get("shared", 0))
    if m:
        ids = torch.cat([ids, shared_ids(ids.shape[0], logits.shape[1], m, ids.device)], dim=1)  # [T,k+m]
    return ids


def moe_topk_bias(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    logits, bias = args  # [T,E], [E]: the bias moves the choice, not the weights (ERNIE 4.5's router)
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    return torch.topk(probs + bias.to(torch.float32), int(node.attr["k"]), dim=-1).indices.to(torch.int32)  # [T,k]


def shared_gate(gate: torch.Tensor, m: int) -> torch.Tensor:
    """f32 [T,m]: sigmoid of the shared expert's gate [T,1], taken in the gate's own type (as
    the unfolded graph's `sigmoid` node does), for each of its m slots."""
    return torch.sigmoid(gate).to(torch.float32).expand(gate.shape[0], m)


def moe_weights(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    logits, ids = args[0], args[1]  # [T,E], [T,k] (or [T,k+m] with a shared gate [T,1] third)
    m = int(node.attr.get("shared", 0))
    routed = ids[:, :ids.shape[1] - m]  # [T,k]
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    w = probs.gather(1, routed.long())  # [T,k] f32
    if node.attr.get("norm"):
        w = w / w.sum(dim=-1, keepdim=True)
    if m:
        w = torch.cat([w, shared_gate(args[2], m)], dim=1)  # [T,k+m]
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


def moe_topk_biased(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """Sigmoid routing's choice (transformers' Glm4Moe / DeepseekV3 / MiniMaxM2 routers): scores
    sigmoid(logits) + bias in f32; with groups, only the groups_used groups whose two best
    scores sum highest compete; ids of the top k. The bias steers the choice only."""
    logits, bias = args  # [T,E], [E]
    k, n, used = int(node.attr["k"]), int(node.attr.get("groups", 1)), int(node.attr.get("groups_used", 1))
    scores = torch.sigmoid(logits.to(torch.float32)) + bias.to(torch.float32)  # [T,E]
    if n > 1:
        T, E = scores.shape
        grouped = scores.view(T, n, E // n)  # [T,n,E/n]
        best = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T,n]
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(used, dim=-1).indices, True)
        scores = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
    return torch.topk(scores, k, dim=-1).indices.to(torch.int32)  # [T,k]


def moe_weights_sigmoid(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """f32 [T,k]: sigmoid of the chosen experts' logits, renormalised over them when `norm`
    (transformers adds 1e-20 to the sum), times `scale` (routed_scaling_factor)."""
    logits, ids = args  # [T,E], [T,k]
    w = torch.sigmoid(logits.to(torch.float32)).gather(1, ids.long())  # [T,k]
    if node.attr.get("norm"):
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * float(node.attr.get("scale", 1.0))
