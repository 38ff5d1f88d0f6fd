"""The cost model's trace (backends.costmodel.timeline.trace), which the Gantt chart draws: it is
the same walk as `evaluate`, so its spans add up to the predicted time and busy time."""

from __future__ import annotations

import numpy as np
import pytest

from planner.placement import PlaceOptions, place
from backends.costmodel.price import price
from backends.costmodel.profiles import load_engine
from hardware.profiles import resolve_system
from backends.costmodel.timeline import evaluate, mask_seconds, trace
from graphir.models import BuildOptions
from graphir.models.sources import load_source
from graphir.quant import scheme


@pytest.mark.parametrize("split,phase", [("graph", "pp"), ("graph", "tg"), ("layer", "pp")])
def test_trace_matches_evaluate(split: str, phase: str) -> None:
    sysm, eng = resolve_system("2x3090"), load_engine("ik_llama.cpp")
    cfg = load_source("qwen3-0.6b").cfg
    g = place(cfg, BuildOptions(phase=phase, quant=scheme("Q4_K_M"), logits="last"),  # type: ignore[arg-type]
              PlaceOptions(split, sysm.devices))  # type: ignore[arg-type]
    pr = price(g, 512)
    spans = trace(pr, sysm, eng, 4096.0)
    tl = evaluate(pr, sysm, eng, np.array([4096.0]))
    host = eng.forward_us * 1e-6 + mask_seconds(pr, eng, np.array([4096.0]))[0]  # the host's work per pass
    assert max(s.end for s in spans) + host == pytest.approx(tl.total[0], rel=1e-9)
    for d, dev in enumerate(pr.devices):
        mine = sorted((s for s in spans if s.device == dev), key=lambda s: s.start)
        assert sum(s.end - s.start for s in mine) == pytest.approx(tl.busy[d, 0], rel=1e-9)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:]))  # one thing at a time
    names = {s.node for s in spans}
    assert {n.name for n in g.nodes if n.op.value in ("copy", "all_reduce")} <= names
    assert {s.kind for s in spans} >= {"gemm", "attn", "vector"} | ({"allreduce"} if split == "graph" else {"copy"})
