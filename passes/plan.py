"""The graph-split plan: which device holds which granules of each layer region.

A layer has two regions: the mixer (attention or delta-net, ending at `attn_residual`) and
the FFN (dense or MoE, ending at `l_out`). Each region splits one or two "shares":

- `heads`  attention, in KV heads (each with its GQA group of Q heads and output gate);
- `kheads` delta-net, in key heads (each with its value heads, conv channels, state slice);
- `ff`     dense FFN, `exps` routed experts, `shexp` shared expert: in intermediate elements.

Granules follow REFERENCE §1: a head group for attention (widened when a quant block of the
output projection spans several groups), max(16, quant block) elements for FFN slices.
The plan is computed from the config and the weight types alone, so the node-count estimate
uses the very same plan as `place_graph`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal, Mapping, Sequence

from graphir.dtypes import DType
from graphir.models.config import ModelConfig

from passes.devices import PlacementError, apportion, granule_ranges, layer_group

Recurrent = Literal["single", "split"]
# families ik_llama.cpp does not split by graph (absent from its is_model_split_supported):
# there `-sm graph` falls back to layer split, and so does place_graph
LAYER_ONLY = frozenset({"gemma3", "gemma4"})
# families whose graph split ik_llama.cpp runs with f32 partial sums even when f16 is asked for
# (llama.cpp's context setup: "GPT-OSS with split mode graph requires f32 precision")
F32_REDUCE = frozenset({"gpt_oss"})
WeightType = Callable[[str, tuple[int, ...]], DType]  # (weight name, full shape) -> storage type


@dataclass(frozen=True)
class Share:
    """One share of a region: `total` units (heads) or elements, cut into per-device ranges."""

    total: int
    ranges: tuple[tuple[int, int] | None, ...]  # per device index; None = no part

    @cached_property
    def devices(self) -> tuple[int, ...]:
        return tuple(j for j, r in enumerate(self.ranges) if r is not None)


@dataclass(frozen=True)
class RegionPlan:
    kind: str  # attn | delta | ffn | moe
    shares: tuple[tuple[str, Share], ...]

    def share(self, name: str) -> Share:
        for k, s in self.shares:
            if k == name:
                return s
        raise KeyError(name)

    @cached_property
    def devices(self) -> tuple[int, ...]:
        """Devices taking part in the region (any share), in device order."""
        return tuple(sorted({j for _, s in self.shares for j in s.devices}))

    @property
    def lead(self) -> int:
        """Where the residual (and the output bias) is added before the reduce."""
        return self.devices[0]


@dataclass(frozen=True)
class GraphPlan:
    devices: tuple[str, ...]
    layers: tuple[tuple[int, RegionPlan, RegionPlan], ...]  # (layer, mixer, ffn)
    embed: int  # device index of the token embedding (and the inputs)
    head: int  # device index of the output head


def _unit_heads(cols_per_unit: int, block: int) -> int:
    """Units per granule so that column cuts of a row-parallel weight stay on block bounds."""
    return math.lcm(cols_per_unit, block) // cols_per_unit


def type_from_scheme(cfg: ModelConfig, quant: Callable[[str, tuple[int, ...], int], DType]) -> WeightType:
    return lambda name, shape: quant(name, shape, cfg.n_layer)


def _share(n_units: int, per_granule: int, total: int, ratios: Sequence[float], debt: list[float]) -> Share:
    granules = -(-n_units // per_granule)
    counts = apportion(granules, ratios, debt)
    return Share(total, granule_ranges(counts, per_granule, n_units))


def plan_graph(cfg: ModelConfig, devices: Sequence[str], wtype: WeightType, *, ts: Sequence[float],
               max_gpu: int | None = None, recurrent: Recurrent = "single",
               layers: Sequence[int] | None = None,
               pinned: Mapping[int, Sequence[float]] | None = None) -> GraphPlan:
    """Per-layer shares for graph split. `ts` are the ratios (one per device); `pinned`
    replaces them for chosen layers (zeros keep a device out of that layer)."""
    n = len(devices)
    live = [j for j in range(n) if ts[j] > 0]
    if max_gpu is not None:
        if max_gpu < 1:
            raise PlacementError(f"--max-gpu {max_gpu}: must be at least 1")
        if max_gpu > n:
            raise PlacementError(f"too few devices: --max-gpu {max_gpu} but {n} device(s)")
        _check_attention_capacity(cfg, wtype, max_gpu, layers)
    if recurrent not in ("single", "split"):
        raise PlacementError(f"--recurrent {recurrent!r}: use single or split")
    debts: dict[str, list[float]] = {}

    def debt(key: str) -> list[float]:
        return debts.setdefault(key, [0.0] * n)

    H = cfg.hidden_size
    out: list[tuple[int, RegionPlan, RegionPlan]] = []
    for i in (layers if layers is not None else range(cfg.n_layer)):
        group = layer_group(i, live, max_gpu)
        ratios = [ts[j] if j in group else 0.0 for j in range(n)]
        if pinned and i in pinned:
            ratios = list(pinned[i])
        p = f"blk.{i}."
        if cfg.is_recurrent(i):
            nk, nv, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_value_head_dim
            if recurrent == "single":  # one device, rotated by the same balancing as granules
                mixer = RegionPlan("delta", (("kheads", _share(nk, nk, nk, ratios, debt("single"))),))
            else:
                blk = wtype(p + "ssm_out.weight", (H, nv * dv)).block_size
                # ik_llama.cpp's granule: a key head's value heads are adjacent ssm_out columns in
                # Qwen3-Next's files, but tiled (dv columns apart) in Qwen3.5's, so each must align
                tiled = cfg.arch in ("qwen3_5", "qwen3_5_moe")
                u = _unit_heads(dv if tiled else (nv // nk) * dv, blk)
                mixer = RegionPlan("delta", (("kheads", _share(nk, u, nk, ratios, debt("kheads"))),))
        else:
            hkv, d = cfg.n_kv_head, cfg.head_dim
            blk = wtype(p + "attn_output.weight", (H, cfg.n_head * d)).block_size
            u = _unit_heads(cfg.gqa * d, blk)
            mixer = RegionPlan("attn", (("heads", _share(hkv, u, hkv, ratios, debt("heads"))),))
        if cfg.is_moe_layer(i):
            N, E = cfg.moe_intermediate_size, cfg.n_expert
            g = math.lcm(16, wtype(p + "ffn_down_exps.weight", (E, H, N)).block_size)
            shares = [("exps", _share(N, g, N, ratios, debt("exps")))]
            Ns = cfg.shared_expert_intermediate_size
            if Ns:
                gs = math.lcm(16, wtype(p + "ffn_down_shexp.weight", (H, Ns)).block_size)
                shares.append(("shexp", _share(Ns, gs, Ns, ratios, debt("shexp"))))
            ffn = RegionPlan("moe", tuple(shares))
        else:
            N = cfg.intermediate_size
            g = math.lcm(16, wtype(p + "ffn_down.weight", (H, N)).block_size)
            ffn = RegionPlan("ffn", (("ff", _share(N, g, N, ratios, debt("ff"))),))
        out.append((i, mixer, ffn))
    return GraphPlan(tuple(devices), tuple(out), live[0], live[0])


def _check_attention_capacity(cfg: ModelConfig, wtype: WeightType, max_gpu: int,
                              layers: Sequence[int] | None) -> None:
    """An explicit --max-gpu asks every layer to split over that many devices; attention can
    only split into whole KV-head granules (REFERENCE §1: 2 KV heads => at most 2 devices)."""
    idx = [i for i in (layers if layers is not None else range(cfg.n_layer)) if not cfg.is_recurrent(i)]
    if not idx or max_gpu <= 1:
        return
    H, d, hkv = cfg.hidden_size, cfg.head_dim, cfg.n_kv_head
    blk = wtype(f"blk.{idx[0]}.attn_output.weight", (H, cfg.n_head * d)).block_size
    u = _unit_heads(cfg.gqa * d, blk)
    pieces = -(-hkv // u)
    if pieces < max_gpu:
        raise PlacementError(
            f"cannot split attention over {max_gpu} devices (--max-gpu {max_gpu}): {hkv} KV head(s) "
            f"in granules of {u} give at most {pieces} piece(s)")
