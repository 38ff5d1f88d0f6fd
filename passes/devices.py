"""Device lists, split ratios and their apportionment to whole granules.

Shared by both placers and by the node-count estimate, so that the estimate predicts exactly
the device participation the placer will choose.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from graphir.errors import GraphirError

_DEV_RE = re.compile(r"(cpu|cuda)(?::(\d+))?")


class PlacementError(GraphirError):
    """A placement request graphir cannot honour; the message is one line with the numbers."""


def parse_devices(spec: str | int | Sequence[str]) -> tuple[str, ...]:
    """`2` -> cuda:0,cuda:1; `cpu,cpu` -> cpu:0,cpu:1 (logical CPU devices); `cuda:0,cuda:1` as is."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        n = int(spec)
        if n < 1:
            raise PlacementError(f"too few devices: {n} (need at least 1)")
        return tuple(f"cuda:{i}" for i in range(n))
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise PlacementError("too few devices: none given")
    out: list[str] = []
    counters: dict[str, int] = {}
    for s in items:
        m = _DEV_RE.fullmatch(s)
        if m is None:
            raise PlacementError(f"unknown device {s!r}: use cpu, cpu:N, cuda:N or a count")
        kind = m.group(1)
        if m.group(2) is None:  # bare `cpu` / `cuda`: the next free index of that kind
            idx = counters.get(kind, 0)
            while f"{kind}:{idx}" in out:
                idx += 1
            name = f"{kind}:{idx}"
        else:
            name = f"{kind}:{int(m.group(2))}"
        if name in out:
            raise PlacementError(f"device {name} listed twice in {','.join(items)}")
        counters[kind] = int(name.split(":")[1]) + 1
        out.append(name)
    return tuple(out)


def parse_ts(spec: str | Sequence[float] | None, n_devices: int) -> tuple[float, ...]:
    """Split ratios (`3,1`); None gives equal shares. Refuses negative, zero-sum, wrong length."""
    if spec is None:
        return tuple(1.0 for _ in range(n_devices))
    if isinstance(spec, str):
        try:
            vals = [float(x) for x in spec.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            raise PlacementError(f"--ts {spec!r}: ratios must be numbers, e.g. 3,1") from None
    else:
        vals = [float(x) for x in spec]
    shown = ",".join(f"{v:g}" for v in vals)
    if len(vals) != n_devices:
        raise PlacementError(f"--ts {shown} has {len(vals)} ratio(s) for {n_devices} device(s)")
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise PlacementError(f"--ts {shown}: ratios must be finite and >= 0")
    if sum(vals) <= 0:
        raise PlacementError(f"--ts {shown}: ratios sum to {sum(vals):g}; at least one must be positive")
    return tuple(vals)


def apportion(n: int, ratios: Sequence[float], debt: list[float]) -> list[int]:
    """Split n granules by ratios into whole counts (largest remainder). `debt` carries each
    device's rounding error from earlier tensors of the same kind and is updated, so that
    rounding balances over the layers (ik_llama.cpp's memory-balancing correction). Devices
    with ratio 0 get nothing and keep their debt."""
    total = sum(ratios)
    live = [j for j, r in enumerate(ratios) if r > 0]
    ideal = [n * ratios[j] / total + debt[j] if ratios[j] > 0 else 0.0 for j in range(len(ratios))]
    counts = [max(0, math.floor(ideal[j] + 1e-9)) if ratios[j] > 0 else 0 for j in range(len(ratios))]
    rem = n - sum(counts)
    # ties go to the lower device index: the sort is stable and keyed on the remainder only
    while rem > 0:
        j = max(live, key=lambda k: (ideal[k] - counts[k], -k))
        counts[j] += 1
        rem -= 1
    while rem < 0:
        cand = [k for k in live if counts[k] > 0]
        j = min(cand, key=lambda k: (ideal[k] - counts[k], k))
        counts[j] -= 1
        rem += 1
    for j in live:
        debt[j] = ideal[j] - counts[j]
    return counts


def granule_ranges(counts: Sequence[int], unit: int, total: int) -> tuple[tuple[int, int] | None, ...]:
    """Consecutive ranges in device order: device j gets counts[j] granules of `unit` elements
    (the last granule may be short: it ends at `total`)."""
    out: list[tuple[int, int] | None] = []
    pos = 0
    for c in counts:
        if c == 0:
            out.append(None)
            continue
        start, stop = pos * unit, min(total, (pos + c) * unit)
        out.append((start, stop))
        pos += c
    return tuple(out)


def layer_group(i: int, live: Sequence[int], max_gpu: int | None) -> tuple[int, ...]:
    """Devices layer i may use: all live ones, or `max_gpu` of them rotated per layer so that
    the layers spread over every device (sorted, so ranges follow device order)."""
    if max_gpu is None or max_gpu >= len(live):
        return tuple(live)
    start = (i * max_gpu) % len(live)
    return tuple(sorted(live[(start + k) % len(live)] for k in range(max_gpu)))
