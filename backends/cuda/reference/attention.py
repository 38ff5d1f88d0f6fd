"""RoPE, causal GQA attention over the KV cache, and the cache append.

Numerics follow transformers: RoPE frequencies in f32 (default, linear, llama3 and yarn
scaling as `modeling_rope_utils` computes them), cos/sin cast to the activation type before
rotating (NeoX / rotate_half pairing on the first n_rot dims of each head, the rest passed
through); attention scores in the activation type, softmax in f32, probabilities cast back
(transformers' eager attention).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import torch

from backends.cuda.reference import kv_quant
from backends.cuda.runtime.interp import ExecContext
from graphir.errors import GraphirError
from graphir.graph import Node
from graphir.ops import Op


# the rope attributes that shape the frequencies (what the frequency caches are keyed on)
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_ctx", "beta_fast", "beta_slow", "truncate",
             "rot_pairs")


@lru_cache(maxsize=64)
def _inv_freq_on(device: torch.device, n_rot: int, theta: float, scaling: str | None,
                 params: tuple[tuple[str, Any], ...]) -> torch.Tensor:
    """The frequencies kept on each device (no host-to-device copy per rope node)."""
    return _inv_freq(n_rot, theta, scaling, params).to(device)


@lru_cache(maxsize=64)
def _inv_freq(n_rot: int, theta: float, scaling: str | None, params: tuple[tuple[str, Any], ...]) -> torch.Tensor:
    """Inverse frequencies [n_rot/2] f32 on the CPU (what transformers' rope init returns)."""
    p = dict(params)
    base = 1.0 / (theta ** (torch.arange(0, n_rot, 2, dtype=torch.int64).to(torch.float32) / n_rot))
    if scaling in (None, "default", "dynamic"):  # dynamic NTK equals default within the trained context
        return base
    factor = float(p.get("factor", 1.0))
    if scaling == "linear":
        return base / factor
    if scaling == "proportional":  # Gemma 4: only the first rot_pairs pairs turn (zero frequency after)
        return torch.where(torch.arange(n_rot // 2) < int(p["rot_pairs"]), base, 0.0) / factor
    if scaling == "llama3":
        lo, hi, old = float(p["low_freq_factor"]), float(p["high_freq_factor"]), float(p["original_ctx"])
        wavelen = 2 * math.pi / base
        llama = torch.where(wavelen > old / lo, base / factor, base)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, llama)
    if scaling == "yarn":
        old = float(p["original_ctx"])
        fast, slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

        def corr(rot: float) -> float:  # the dim index that turns `rot` times over the old context
            return (n_rot * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = (corr(fast), corr(slow)) if p.get("truncate") is False else (math.floor(corr(fast)), math.ceil(corr(slow)))
        low, high = max(lo, 0), min(hi, n_rot - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(n_rot // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos = theta ** (torch.arange(0, n_rot, 2).to(torch.float32) / n_rot)
        extra = 1 - ramp  # share of the unscaled (extrapolated) frequency per dim
        return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
    raise GraphirError(f"rope scaling {scaling!r} is not supported (default, linear, proportional, llama3, yarn)")


def _attn_factor(attrs: dict[str, Any]) -> float:
    if attrs.get("scaling") != "yarn":
        return 1.0
    if "attn_factor" in attrs:
        return float(attrs["attn_factor"])
    factor = float(attrs.get("factor", 1.0))
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rope_tables(attrs: dict[str, Any], pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, n_rot] in `dtype` for positions `pos` [T]."""
    params = tuple((k, attrs[k]) for k in ROPE_KEYS if k in attrs)
    inv = _inv_freq_on(pos.device, int(attrs["n_rot"]), float(attrs["theta"]), attrs.get("scaling"), params)
    freqs = pos.to(torch.float32)[:, None] * inv[None, :]  # [T, n_rot/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, n_rot]
    f = _attn_factor(attrs)
    return (emb.cos() * f).to(dtype), (emb.sin() * f).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    x, pos = args  # x [T,heads,d], pos [T]
    n_rot = int(node.attr["n_rot"])
    cos, sin = rope_tables(node.attr, pos, x.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T,1,n_rot] broadcast over heads
    xr = x[..., :n_rot]
    out = xr * cos + rotate_half(xr) * sin
    return torch.cat((out, x[..., n_rot:]), dim=-1) if n_rot < x.shape[-1] else out


def attn_temp(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """Llama-4 query temperature: the scale in f32 from the positions, cast to q's type, as
    transformers' get_llama_4_attn_scale does."""
    q, pos = args  # q [T,heads,d], pos [T]
    p = pos.to(torch.float32)
    scale = 1 + float(node.attr["beta"]) * torch.log(1 + torch.floor(p / int(node.attr["length"])))  # [T]
    return q * scale.to(q.dtype)[:, None, None]
def query_positions(node: Node, ctx: ExecContext, T: int, S: int, device: torch.device) -> torch.Tensor:
    """Absolute positions [T] of the queries: S-T+i, or in bucket mode (a fixed-size cache read
    as its first S rows) the device-side position of the first query plus i."""
    base = ctx.kvpos[ctx.device_name(node)] if ctx.bucket is not None else S - T  # int64 [1] or int
    return torch.arange(T, device=device) + base


def needs_mask(node: Node, args: Sequence[torch.Tensor]) -> bool:
    """Sliding-window or sink attention: the fast decode kernels know neither, this one does."""
    return "window" in node.attr or len(args) > 3


def cache_floats(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention node's K and V as floats of `dtype` (a block-quantised cache dequantised)."""
    return tuple(kv_quant.floats(args[i], ctx.graph[node.inputs[i]].spec.dtype.name, dtype)  # type: ignore[return-value]
                 for i in (1, 2))


def attention(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """Causal attention: query i sits at absolute position S-T+i; q head j reads kv head j // g.
    `window` W: a query at p sees keys p-W+1..p only (transformers' sliding window). Sinks (a
    4th input, one logit per q head) join each row's softmax as a column without a value."""
    q = args[0]
    k, v = cache_floats(node, args, ctx, q.dtype)  # q [T,hq,d], k [S,hkv,d], v [S,hkv,dv]
    T, hq, d = q.shape
    S, hkv, dv = v.shape
    g = hq // hkv
    qh = q.reshape(T, hkv, g, d).permute(1, 2, 0, 3)  # [hkv,g,T,d]
    kh = k.permute(1, 0, 2)[:, None]  # [hkv,1,S,d]
    vh = v.permute(1, 0, 2)[:, None]  # [hkv,1,S,dv]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * float(node.attr["scale"])  # [hkv,g,T,S]
    window = node.attr.get("window")
    if T > 1 or window is not None or ctx.bucket is not None:  # a lone query (decode) sees every cached key
        qpos = query_positions(node, ctx, T, S, q.device)
        keys = torch.arange(S, device=q.device)[None, :]
        hidden = keys > qpos[:, None]  # [T,S]: the future
        if window is not None:
            hidden = hidden | (keys <= qpos[:, None] - int(window))
        scores = scores.masked_fill(hidden, float("-inf"))
    if len(args) > 3:  # [hq] -> [hkv,g,T,1], one more softmax column per row
        sink = args[3].to(scores.dtype).reshape(hkv, g, 1, 1).expand(hkv, g, T, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1, dtype=torch.float32)[..., :S]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(q.dtype), vh)  # [hkv,g,T,dv]
    return out.permute(2, 0, 1, 3).reshape(T, hq, dv)


def kv_append(node: Node, args: Sequence[torch.Tensor], ctx: ExecContext) -> torch.Tensor:
    """cache [KV,...] ++ new [T,...] -> [KV+T,...] in the cache's type. When the cache is a
    view of the session's preallocated buffer, the rows are written in place and a view of
    [0:KV+T] returned: no copy of the whole cache per token."""
    cache, new = args
    n0, t = cache.shape[0], new.shape[0]
    src = ctx.graph[node.inputs[0]]
    buf = ctx.buffers.get(src.attr["state"]) if src.op == Op.STATE_IN else None
    if (buf is not None and buf.shape[0] >= n0 + t and buf.device == new.device
            and (n0 == 0 or cache.data_ptr() == buf.data_ptr())):
        buf[n0:n0 + t].copy_(kv_quant.to_cache(new, node.spec.dtype.name, buf))  # in the cache's type
        return buf[:n0 + t]
    return torch.cat((cache, kv_quant.to_cache(new, node.spec.dtype.name, cache)), dim=0)
