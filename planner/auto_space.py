"""The search space of `place_auto`: one `Choice` is one placement of a whole model.

Per layer kind (attention, delta-net, dense FFN, MoE) a region is either `whole` on its
layer's home device or `split` tensor-parallel over a device group; home devices are
contiguous layer ranges (`home` = layers per device, llama.cpp's layer split); split regions
use `ratios` within their group. Layer split is `Choice(split=())`; graph split (delta-net on
one device) is every kind but `delta` split. Analyses of placed graphs used by the plan
(state layout, resident pieces) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from graphir.graph import Graph, Node
from graphir.models.config import ModelConfig
from graphir.ops import Op

from passes.regions import RegionAssignment, RegionCache, Ratios, one_hot, place_regions, sections
from passes.devices import PlacementError
from passes.place import layer_devices

KINDS = ("attn", "delta", "ffn", "moe")  # canonical order of layer kinds
KIND_NAMES = {"attn": "attention", "delta": "delta-net", "ffn": "dense FFN", "moe": "MoE"}


def mixer_kind(cfg: ModelConfig, i: int) -> str:
    return "delta" if cfg.is_recurrent(i) else "attn"


def ffn_kind(cfg: ModelConfig, i: int) -> str:
    return "moe" if cfg.is_moe_layer(i) else "ffn"


def model_kinds(cfg: ModelConfig, layers: Sequence[int]) -> tuple[str, ...]:
    present = {mixer_kind(cfg, i) for i in layers} | {ffn_kind(cfg, i) for i in layers}
    return tuple(k for k in KINDS if k in present)


def home_counts(cfg: ModelConfig, n_devices: int, layers: Sequence[int], ts: Sequence[float]) -> tuple[int, ...]:
    """Layers per device under llama.cpp's layer rule for ratios `ts`."""
    where = layer_devices(cfg, n_devices, list(layers), list(ts))
    return tuple(sum(1 for i in layers if where[i] == j) for j in range(n_devices))


@dataclass(frozen=True)
class Choice:
    """One placement: which layer kinds split, home layers per device, split ratios."""

    split: tuple[str, ...]  # kinds split tensor-parallel, in KINDS order
    home: tuple[int, ...]  # contiguous layers per device (sums to the layer count)
    ratios: tuple[float, ...]  # split ratios per device (within the group)
    group: int = 0  # split over groups of this many devices (0 = all devices)
    reduce_dtype: str | None = None  # type partials travel in (None: the engine's default)
    head_split: bool = False  # output head split by vocabulary rows over the last layer's group

    @property
    def name(self) -> str:
        """Short, stable label: `split attn+moe; home 24/24; ts 1/1; reduce f16`."""
        parts = [("split " + "+".join(self.split)) if self.split else "whole layers"]
        parts.append("home " + "/".join(str(c) for c in self.home))
        if self.split:
            parts.append("ts " + "/".join(f"{r:g}" for r in self.ratios))
            if self.group:
                parts.append(f"groups of {self.group}")
        if self.reduce_dtype:
            parts.append(f"reduce {self.reduce_dtype}")
        if self.head_split:
            parts.append("head split")
        return "; ".join(parts)

    def with_(self, **kw: object) -> "Choice":
        return replace(self, **kw)  # type: ignore[arg-type]

    def homes(self, layers: Sequence[int]) -> dict[int, int]:
        if sum(self.home) != len(layers):
            raise PlacementError(f"place_auto: home layers {list(self.home)} do not sum to {len(layers)} layers")
        out: dict[int, int] = {}
        pos = 0
        for j, c in enumerate(self.home):
            for i in layers[pos:pos + c]:
                out[i] = j
            pos += c
        return out

    def group_of(self, j: int, n: int) -> tuple[int, ...]:
        """Devices a region of a layer homed on device j splits over."""
        if not self.group or self.group >= n:
            return tuple(range(n))
        start = (j // self.group) * self.group
        return tuple(range(start, min(n, start + self.group)))

    def assignment(self, cfg: ModelConfig, n: int, layers: Sequence[int]) -> RegionAssignment:
        homes = self.homes(layers)

        def vec(kind: str, i: int) -> Ratios:
            if kind not in self.split:
                return one_hot(n, homes[i])
            grp = self.group_of(homes[i], n)
            r = tuple(self.ratios[j] if j in grp else 0.0 for j in range(n))
            return r if sum(r) > 0 else one_hot(n, homes[i])

        mixer = tuple((i, vec(mixer_kind(cfg, i), i)) for i in layers)
        ffn = tuple((i, vec(ffn_kind(cfg, i), i)) for i in layers)
        # embedding where the first region runs (no copy when it is whole), head where the
        # last one ends (any holder of the final residual)
        first, last = mixer[0][1], ffn[-1][1]
        embed = next(j for j, r in enumerate(first) if r > 0)
        head = next(j for j, r in enumerate(last) if r > 0)
        over = self.group_of(homes[layers[-1]], n) if self.head_split else ()
        return RegionAssignment(mixer, ffn, embed, over[0] if over else head, over)


def layer_choice(home: tuple[int, ...], n: int) -> Choice:
    return Choice((), home, tuple(1.0 for _ in range(n)))


def graph_choice(kinds: Sequence[str], home: tuple[int, ...], n: int) -> Choice:
    """Graph split as ik_llama.cpp runs it: everything split but delta-net layers."""
    return Choice(tuple(k for k in kinds if k != "delta"), home, tuple(1.0 for _ in range(n)))


# ---- analyses of placed graphs ------------------------------------------------------------

Piece = tuple[str, str, int, int, int]  # (source, device, slice dim, start, stop); -1s = whole


def _piece(src: str, attrs: dict, device: str) -> Piece:
    if "slice_dim" in attrs:
        return (src, device, int(attrs["slice_dim"]), int(attrs["start"]), int(attrs["stop"]))
    return (src, device, -1, -1, -1)


def weight_piece(n: Node) -> Piece:
    attrs = dict(n.attr)
    return _piece(str(attrs.get("src", n.name)), attrs, n.device or "")


def state_piece(n: Node) -> Piece:
    """A state leaf's piece, keyed by its state (a split piece's `src` is the state key)."""
    attrs = dict(n.attr)
    return _piece(str(attrs.get("src", attrs.get("state", n.name))), attrs, n.device or "")


def state_layout(g: Graph) -> tuple[Piece, ...]:
    """Where every piece of KV cache and recurrent state lives: PP and TG graphs that share a
    cache must agree on this, or every phase change would move the cache."""
    return tuple(sorted(state_piece(n) for n in g.nodes if n.op == Op.STATE_IN))


def resident_pieces(g: Graph, ctx: int) -> dict[tuple[str, Piece], int]:
    """Bytes of every weight and state piece, keyed by (weight | kv | state, piece): a plan that
    runs several placements holds the union of their pieces (a shared piece counts once)."""
    env = {"KV": ctx, "T": 1}
    out: dict[tuple[str, Piece], int] = {}
    for n in g.nodes:
        if n.op == Op.WEIGHT:
            out[("weight", weight_piece(n))] = n.spec.nbytes_at(env)
        elif n.op == Op.STATE_IN:
            grows = n.spec.nbytes_at({"KV": 1, "T": 1}) != n.spec.nbytes_at({"KV": 0, "T": 1})
            out[("kv" if grows else "state", state_piece(n))] = n.spec.nbytes_at(env)
    return out


def place_choice(g: Graph, cfg: ModelConfig, devices: Sequence[str], choice: Choice,
                 cache: RegionCache | None = None) -> Graph:
    """The unplaced graph `g` (either phase) placed as `choice` says."""
    layers = [i for i, _ in sections(g)[1]]
    ra = choice.assignment(cfg, len(devices), layers)
    return place_regions(g, cfg, devices, ra, reduce_dtype=choice.reduce_dtype, cache=cache)
