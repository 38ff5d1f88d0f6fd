"""Qwen3-Next's recurrent pieces: the causal depthwise conv and the gated delta rule.

`delta_rule_recurrent` is the exact reference (one state update per token, as transformers'
torch_recurrent_gated_delta_rule); `delta_rule_chunked` computes the same in chunks of 64
tokens with a triangular solve per chunk (transformers' torch_chunk_gated_delta_rule), which
is what long prompts want. Both take and return the state in the kernel's [nv,dk,dv] layout;
the IR keeps it as [dk,nv,dv] (ggml's layout), converted at the kernel boundary.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from backends.cuda.runtime.interp import ExecContext
from graphir.graph import Node

CHUNK = 64  # tokens per chunk of the chunked form; shorter calls run the recurrent form


def ssm_conv(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """x [K-1+T, C] (previous conv state rows first), w [C, K] -> [T, C]; silu if act=silu."""
    x, w = args
    C, K = w.shape
    xc = x.to(w.dtype).t().unsqueeze(0)  # [1,C,K-1+T]
    out = F.conv1d(xc, w.unsqueeze(1), groups=C)  # [1,C,T]: no padding, the state is the left context
    if node.attr.get("act") == "silu":
        out = F.silu(out)
    return out[0].t().to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             qk_l2norm: bool) -> tuple[torch.Tensor, ...]:
    """f32, key heads repeated to value heads (head j of nv reads key head j // r), [nv,T,...]."""
    r = v.shape[1] // q.shape[1]
    if r > 1:
        q, k = q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1)  # [T,nv,dk]
    q, k, v = (x.transpose(0, 1).to(torch.float32).contiguous() for x in (q, k, v))  # [nv,T,d]
    g, beta = (x.t().to(torch.float32).contiguous() for x in (g, beta))  # [nv,T]
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q, k, v, g, beta


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor, qk_l2norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q,k [T,nk,dk], v [T,nv,dv], g,beta [T,nv], state [nv,dk,dv] -> out [T,nv,dv] f32, state."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta, qk_l2norm)
    q = q / (q.shape[-1] ** 0.5)
    S = state.to(torch.float32).clone()  # [nv,dk,dv]
    out = torch.empty_like(v)  # [nv,T,dv]
    for t in range(v.shape[1]):
        S = S * g[:, t].exp()[:, None, None]  # decay
        kt = k[:, t, :, None]  # [nv,dk,1]
        mem = (S * kt).sum(dim=-2)  # what the state recalls for k_t: [nv,dv]
        delta = (v[:, t] - mem) * beta[:, t, None]
        S = S + kt * delta[:, None, :]
        out[:, t] = (S * q[:, t, :, None]).sum(dim=-2)
    return out.transpose(0, 1), S


class ChunkTerms(NamedTuple):
    """What the chunked delta rule needs per chunk, all f32 [nv, n, C, ...] (C = chunk)."""

    u: torch.Tensor  # [nv,n,C,dv] values after the UT transform
    w: torch.Tensor  # [nv,n,C,dk] decayed keys after the UT transform (read the incoming state)
    attn: torch.Tensor  # [nv,n,C,C] causal q·k within the chunk, decayed
    qd: torch.Tensor  # [nv,n,C,dk] queries decayed from the chunk start
    kd: torch.Tensor  # [nv,n,C,dk] keys decayed to the chunk end
    last: torch.Tensor  # [nv,n] decay over the whole chunk


def chunk_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                qk_l2norm: bool, chunk: int) -> ChunkTerms:
    """The intra-chunk part of the chunked delta rule (shared by the torch and Triton paths):
    within a chunk the delta-rule updates form a unit lower-triangular system (the UT
    transform), solved once for the values and the decayed keys together."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta, qk_l2norm)  # [nv,T,d] f32
    q = q * q.shape[-1] ** -0.5
    nv, T, dv = v.shape
    pad = (chunk - T % chunk) % chunk
    # padded steps have beta = 0 and g = 0: they neither write the state nor decay it
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(nv, n, chunk, x.shape[-1]) for x in (q, k, v))  # [nv,n,C,d]
    g, beta = g.reshape(nv, n, chunk), beta.reshape(nv, n, chunk)
    kb = k * beta[..., None]
    G = g.cumsum(-1)  # log decay from the chunk start: [nv,n,C]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [nv,n,C,C]
    system = (kb @ k.transpose(-1, -2)) * decay  # its strict lower part couples the updates
    eG = G.exp()[..., None]
    rhs = torch.cat((v * beta[..., None], kb * eG), dim=-1)  # one triangular solve for u and w
    uw = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # causal within the chunk (diagonal kept)
    kd = k * (G[..., -1:] - G).exp()[..., None]
    return ChunkTerms(uw[..., :dv], uw[..., dv:], attn, q * eG, kd, G[..., -1].exp())


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor, qk_l2norm: bool = True, chunk: int = CHUNK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as delta_rule_recurrent, in chunks (see chunk_terms)."""
    T = q.shape[0]
    c = chunk_terms(q, k, v, g, beta, qk_l2norm, chunk)
    nv, n = c.last.shape
    S = state.to(torch.float32).clone()
    out = torch.empty_like(c.u)
    for i in range(n):
        vn = c.u[:, i] - c.w[:, i] @ S  # the part of each value the state does not already predict
        out[:, i] = c.qd[:, i] @ S + c.attn[:, i] @ vn
        S = S * c.last[:, i, None, None] + c.kd[:, i].transpose(-1, -2) @ vn
    out = out.reshape(nv, n * chunk, -1)[:, :T]
    return out.transpose(0, 1), S


def raw_gates(alpha: torch.Tensor, b: torch.Tensor, dt_bias: torch.Tensor, a: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A delta_net with `raw_gates`: (g, beta) from the projections, as the unfused graph makes
    them: g = softplus(f32(alpha) + dt_bias) * a (a = -exp(A_log)), beta = sigmoid(b) in b's type."""
    return F.softplus(alpha.to(torch.float32) + dt_bias) * a, torch.sigmoid(b)


def gates_of(node: Node, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The six-input form of a delta_net's arguments (gates computed when they come raw)."""
    if not node.attr.get("raw_gates"):
        return list(args)
    q, k, v, alpha, b, state, dt_bias, a = args
    return [q, k, v, *raw_gates(alpha, b, dt_bias, a), state]


def delta_net(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """Packed result [T+dk, nv, dv] f32: rows [0,T) the output, rows [T,T+dk) the new state."""
    q, k, v, g, beta, state = gates_of(node, args)  # state [dk,nv,dv]
    qk = bool(node.attr.get("qk_l2norm", False))
    fn = delta_rule_chunked if q.shape[0] > CHUNK else delta_rule_recurrent
    out, S = fn(q, k, v, g, beta, state.permute(1, 0, 2), qk)  # S [nv,dk,dv]
    return torch.cat((out, S.permute(1, 0, 2)), dim=0)
