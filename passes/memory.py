"""Memory plan per device: weights, KV cache, recurrent state and a compute-buffer estimate.

Weights are the weight leaves' storage bytes (quant types by whole blocks; a concat of
weights is folded at load time and costs nothing extra). The KV cache is every state leaf
with a `KV` dim bound to the context length (a sliding-window layer's cache to its window plus
a u-batch, as llama.cpp sizes an SWA cache); other states (conv, delta-net) are recurrent
state. The compute buffer is the peak of live activations walking the graph in program order
at the u-batch size (views share their source; `kv_append` writes into the cache in place).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from graphir import dims as D
from graphir.graph import Graph
from graphir.stats import cache_windows
from graphir.ops import LEAVES, VIEWS, Op

from hardware.profiles import gpu_memory
from passes.devices import PlacementError
from passes.transfers import devices_of

GIB = 1 << 30
_UNITS = {"": GIB, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": GIB, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


class MemoryPlanError(PlacementError):
    """A placement that does not fit its devices; the message lists every device's numbers."""


@dataclass(frozen=True)
class DeviceMemory:
    device: str
    weights: int
    kv: int
    state: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.state + self.compute


@dataclass(frozen=True)
class MemoryPlan:
    ctx: int
    ubatch: int
    devices: tuple[DeviceMemory, ...]

    def of(self, device: str) -> DeviceMemory:
        return next(d for d in self.devices if d.device == device)


def parse_mem(spec: str | Sequence[int | str], n_devices: int | None = None) -> tuple[int, ...]:
    """`24GiB,24GiB` (a bare number is GiB), or a hardware preset `2x3090`; -> bytes per device."""
    if isinstance(spec, str):
        preset = _hardware(spec)
        if preset is not None:
            if n_devices is not None and len(preset) != n_devices:
                raise PlacementError(f"--mem {spec} has {len(preset)} device(s), the placement {n_devices}")
            return preset
        items: Sequence[int | str] = [s for s in spec.split(",") if s.strip()]
    else:
        items = spec
    out: list[int] = []
    for it in items:
        if isinstance(it, int):
            out.append(it)
            continue
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", it)
        if not m or m.group(2).lower() not in _UNITS:
            raise PlacementError(f"--mem {it!r}: use sizes like 24GiB or 80GB, or a preset like 2x3090")
        out.append(int(float(m.group(1)) * _UNITS[m.group(2).lower()]))
    if n_devices is not None and len(out) != n_devices:
        raise PlacementError(f"--mem gives {len(out)} size(s) for {n_devices} device(s)")
    return tuple(out)


def _hardware(spec: str) -> tuple[int, ...] | None:
    """Memory per GPU of a hardware preset (`2x3090`, `2xA6000-nvlink`, `3xH200`: the systems
    and GPUs of hardware/profiles.py); None for a list of sizes."""
    if "," in spec or re.fullmatch(r"\s*[0-9.]+\s*[A-Za-z]*\s*", spec):
        return None
    return gpu_memory(spec)


def state_bytes(g: Graph, ctx: int, ubatch: int) -> dict[str, int]:
    """Bytes of every state leaf at context `ctx` (windowed caches hold window + ubatch rows)."""
    win = cache_windows(g)
    env = {"KV": ctx, "T": 1}
    return {n.name: n.spec.nbytes_at({**env, "KV": min(ctx, win[n.name] + ubatch)} if n.name in win else env)
            for n in g.nodes if n.op == Op.STATE_IN}


def plan_memory(g: Graph, ctx: int = 4096, ubatch: int = 512) -> MemoryPlan:
    env = {"KV": ctx, "T": ubatch if g.info.get("phase", "pp") == "pp" else 1}
    devs = list(devices_of(g)) or ["-"]
    acc = {d: [0, 0, 0, 0] for d in devs}  # weights, kv, state, compute

    def where(n) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
        return n.devices or ("-",)

    # a view keeps its source alive: account every read of a view to the viewed buffer
    owner: dict[str, str] = {}
    for n in g.nodes:
        if n.op in VIEWS or n.op == Op.OUTPUT:
            owner[n.name] = owner.get(n.inputs[0], n.inputs[0])
    last: dict[str, int] = {}
    for pos, n in enumerate(g.nodes):
        for i in n.inputs:
            last[owner.get(i, i)] = pos
    live = {d: 0 for d in devs}
    size: dict[str, int] = {}
    states = state_bytes(g, ctx, ubatch)
    for pos, n in enumerate(g.nodes):
        if n.op == Op.WEIGHT:
            for d in where(n):
                acc[d][0] += n.spec.nbytes_at(env)
        elif n.op == Op.STATE_IN:
            k = 1 if any(D.symbols(x) for x in n.spec.shape) else 2
            for d in where(n):
                acc[d][k] += states[n.name]
        elif n.op not in LEAVES and n.op not in VIEWS and n.op not in (Op.OUTPUT, Op.KV_APPEND) \
                and not (n.op == Op.CONCAT and all(g[i].op == Op.WEIGHT for i in n.inputs)):
            size[n.name] = n.spec.nbytes_at(env)
            for d in where(n):
                live[d] += size[n.name]
                acc[d][3] = max(acc[d][3], live[d])
        for i in dict.fromkeys(owner.get(x, x) for x in n.inputs):
            if last.get(i) == pos and i in size:
                for d in where(g[i]):
                    live[d] -= size[i]
    return MemoryPlan(ctx, ubatch, tuple(DeviceMemory(d, *acc[d]) for d in devs))


def _gib(x: int) -> str:
    return f"{x / GIB:.2f}"


def describe(m: DeviceMemory) -> str:
    return (f"{m.device} {_gib(m.total)} GiB (weights {_gib(m.weights)}, KV {_gib(m.kv)}, "
            f"state {_gib(m.state)}, compute {_gib(m.compute)})")


def check_fit(plan: MemoryPlan, capacity: Mapping[str, int] | Sequence[int]) -> None:
    """Raise MemoryPlanError, one line with every device's numbers, if any device overflows."""
    caps = dict(capacity) if isinstance(capacity, Mapping) else dict(zip((d.device for d in plan.devices), capacity))
    if not isinstance(capacity, Mapping) and len(capacity) != len(plan.devices):
        raise MemoryPlanError(f"--mem gives {len(capacity)} size(s) for {len(plan.devices)} device(s)")
    over = [d for d in plan.devices if d.total > caps.get(d.device, 0)]
    if over:
        parts = [f"{describe(d)} of {_gib(caps.get(d.device, 0))} GiB" for d in plan.devices]
        raise MemoryPlanError(f"does not fit at ctx {plan.ctx}: " + "; ".join(parts)
                              + " (pass --allow-overflow to place it anyway)")


def fit_problem(need: Mapping[str, float], have: Mapping[str, float], what: str = "") -> str | None:
    """One line with each device's need against its capacity (bytes in, GiB out) when any
    device overflows, else None. `what` names the placement (`split layer at ctx 4096`)."""
    if all(need[d] <= have.get(d, 0) for d in need):
        return None
    parts = ", ".join(f"{d} needs {need[d] / GIB:.2f} GiB of {have.get(d, 0) / GIB:.2f} GiB" for d in need)
    return f"does not fit{' (' + what + ')' if what else ''}: {parts}"


def enforce_fit(problem: str | None, allow_overflow: bool, hint: str = "") -> str | None:
    """Raise MemoryPlanError for `problem` unless `allow_overflow`; else hand it back for the
    caller to print as a warning (None when it fits)."""
    if problem and not allow_overflow:
        raise MemoryPlanError(f"{problem}; {hint + ', or ' if hint else ''}pass --allow-overflow to go on anyway")
    return problem
