"""The engine's fusion passes: what the CUDA executor walks is what the cost model prices, and
fusing changes no logits.

Oracles: the cost model's own placement + engine passes (backends.costmodel) for the node
lists; the unfused graph on CPU devices (f32, random weights) for the values.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from passes.manager import engine_graph
from planner.placement import PlaceOptions, place
from backends.costmodel.price import price
from backends.costmodel.profiles import load_engine
from cli.run import DEFAULT_PASSES, make_transform
from backends.cuda.capture.decode_step import DecodeStep, decode_schedule
from backends.cuda.weights.loader import executed_graph
from backends.cuda.rules.pipeline import ENGINE_PASSES, MERGES
from backends.cuda.runtime.session import Session
from graphir.graph import Graph, Node, verify
from graphir.models import BuildOptions, build, from_hf_dict
from graphir.models.sources import load_preset, preset_names
from graphir.ops import LEAVES, VIEWS, Op
from graphir.quant import scheme
from helpers.tiny_models import CONFIGS

PROMPT = [5, 3, 9, 1, 1, 7, 2, 8]
TWO = ("cpu:0", "cpu:1")


def _launching(nodes: list[Node]) -> list[Node]:
    """Nodes that run a kernel per call (leaves, views and outputs do not)."""
    return [n for n in nodes if n.op not in LEAVES and n.op not in VIEWS and n.op != Op.OUTPUT]


def _executor_walk(cfg, opts: BuildOptions, devs: tuple[str, ...], split: str | None) -> list[Node]:
    """The nodes the executor runs per call: the session's transform (placement, then the
    engine passes), load-time constants folded, walked as run_graph (prefill) or a decode
    step's schedule (decode) walks them."""
    g = build(cfg, opts)
    for f in make_transform(cfg, devs, split, passes=DEFAULT_PASSES):
        g = f(g)
    verify(g)
    ex = executed_graph(g)
    if opts.phase == "pp":
        return _launching(list(ex.nodes))
    items = decode_schedule(ex, devs[0])
    return _launching([n for it in items for n in (it[2] if it[0] == "seg" else (it[1],))])


SPLITS = [(None, ("cpu",))] + [("layer", TWO)]
CASES = [(p, ph, sp, d) for p in preset_names() for ph in ("pp", "tg") for sp, d in SPLITS]
CASES += [(p, ph, "graph", TWO) for p in ("qwen3-next-80b-a3b", "qwen3-30b-a3b", "qwen3-8b") for ph in ("pp", "tg")]


@pytest.mark.parametrize("preset,phase,split,devs", CASES)
def test_executor_runs_the_nodes_the_cost_model_prices(preset: str, phase: str, split: str | None,
                                                        devs: tuple[str, ...]) -> None:
    cfg = load_preset(preset)
    opts = BuildOptions(phase=phase, quant=scheme("bf16"), kv_type="bf16", logits="last")  # type: ignore[arg-type]
    walk = _executor_walk(cfg, opts, devs, split)
    pr = price(engine_graph(place(cfg, opts, PlaceOptions(split or "layer", devs)), cfg,
                            load_engine("graphir-cuda").passes), 512)
    priced = Counter(pr.ops) + Counter(n.op.value for n in walk if n.op in (Op.COPY, Op.ALL_REDUCE))
    ran = Counter(n.op.value for n in walk)
    assert ran == priced, f"executed - priced: {ran - priced}; priced - executed: {priced - ran}"
    comm = sorted(n.name for n in walk if n.op in (Op.COPY, Op.ALL_REDUCE))
    assert sorted(pr.names) == sorted(n.name for n in walk if n.op not in (Op.COPY, Op.ALL_REDUCE))
    assert sorted(pr.comm_names) == comm
    if phase == "tg" and split != "graph":  # the decode fusions are in what both run (a graph
        # split's residual adds feed an all-reduce, not a norm: they stay apart, as they ran before)
        assert ran[Op.ADD_RMS_NORM.value] + ran[Op.MOE_SUM_ADD_RMS_NORM.value] >= cfg.n_layer


def test_engine_profile_lists_the_executor_passes() -> None:
    assert tuple(load_engine("graphir-cuda").passes) == ENGINE_PASSES == tuple(DEFAULT_PASSES.split(","))
    assert load_engine("graphir-cuda").decode_kernels == {}  # launches are counted from the graph now


def test_session_executes_the_structural_walk() -> None:
    """The walk above is the executor's own: a real session on CPU devices holds exactly the
    folded graphs, and its decode step schedules every node of the decode graph once."""
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    s = Session(cfg, "random", TWO, 64, transform=make_transform(cfg, TWO, "layer", passes=DEFAULT_PASSES))
    for ph in ("pp", "tg"):
        assert s.executed[ph] == executed_graph(s.graphs[ph])
    step = DecodeStep(s, 32, capture=False)
    ran = [n for it in step.schedule for n in (it[2] if it[0] == "seg" else (it[1],))]
    assert sorted(n.name for n in ran) == sorted(n.name for n in s.executed["tg"].nodes)
    assert ran == [n for it in decode_schedule(s.executed["tg"], TWO[0])
                   for n in (it[2] if it[0] == "seg" else (it[1],))]


def _session(cfg, passes: tuple[str, ...], devs: tuple[str, ...], split: str | None, dtype: str) -> Session:
    return Session(cfg, "random", devs, 64, dtype=dtype, transform=make_transform(cfg, devs, split,
                                                                                 passes=",".join(passes) or "none"))


def _logits(s: Session) -> torch.Tensor:
    rows = [s.prefill(PROMPT[:5]), s.prefill(PROMPT[5:]), s.decode([4, 2, 6])]
    s.reset()
    s.prefill(PROMPT)
    step = DecodeStep(s, 32, capture=False)
    for t in (4, 2, 6):
        step.step(t)
        rows.append(step.logits.to(torch.float32))
    return torch.cat(rows)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("split,devs", [(None, ("cpu",)), ("layer", TWO), ("graph", TWO)])
def test_fused_graph_gives_the_unfused_logits(arch: str, split: str | None, devs: tuple[str, ...]) -> None:
    """f32: every reference kernel of a fused op computes what the nodes it replaces computed,
    in the same order, so the logits are bit for bit those of the unfused graph."""
    cfg = from_hf_dict(CONFIGS[arch])
    fused = _session(cfg, ENGINE_PASSES, devs, split, "f32")
    tg = fused.executed["tg"]
    assert split == "graph" or tg.by_op(Op.ADD_RMS_NORM) or tg.by_op(Op.MOE_SUM_ADD_RMS_NORM)
    if arch != "llama":
        assert tg.by_op(Op.MOE_TOPK_WEIGHTS)
    want = _logits(_session(cfg, MERGES, devs, split, "f32"))
    assert torch.equal(_logits(fused), want)


def test_fused_bf16_gated_norm_rounds_as_the_cast_did() -> None:
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    fused = _session(cfg, ENGINE_PASSES, ("cpu",), None, "bf16")
    assert fused.executed["tg"].by_op(Op.CAST_RMS_NORM_GATED) and not fused.executed["tg"].by_op(Op.CAST)
    assert torch.equal(_logits(fused), _logits(_session(cfg, MERGES, ("cpu",), None, "bf16")))


def test_in_place_state_is_the_state_the_unfused_step_leaves() -> None:
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    a, b = (_session(cfg, p, ("cpu",), None, "f32") for p in (ENGINE_PASSES, MERGES))
    tg = a.executed["tg"]
    n_dn = len(tg.by_op(Op.DELTA_NET))
    assert n_dn and all(n.attr.get("in_place") for n in tg.by_op(Op.DELTA_NET))
    assert len(tg.by_op(Op.SSM_CONV_STEP)) == n_dn and not tg.by_op(Op.CONCAT)
    for s in (a, b):
        s.prefill(PROMPT)
        s.decode([3])
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k


def _graph(name: str, phase: str) -> Graph:
    from passes.manager import PassContext, run_pipeline

    cfg = load_preset(name)
    g = build(cfg, BuildOptions(phase=phase, quant=scheme("bf16"), kv_type="bf16"), range(0, 4))  # type: ignore[arg-type]
    return run_pipeline(g, ENGINE_PASSES, PassContext(cfg=cfg)).graph


def test_prefill_keeps_the_decode_only_fusions_out() -> None:
    pp = _graph("qwen3-next-80b-a3b", "pp")
    assert pp.by_op(Op.ADD) and pp.by_op(Op.SSM_CONV) and not pp.by_op(Op.ADD_RMS_NORM)
    assert not pp.by_op(Op.MOE_TOPK_WEIGHTS)  # the shared gate's top-k runs in decode only
    assert _graph("qwen3-30b-a3b", "pp").by_op(Op.MOE_TOPK_WEIGHTS)  # without a shared expert: both phases
