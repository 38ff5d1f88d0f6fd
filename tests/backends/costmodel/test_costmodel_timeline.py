"""Timeline on hand-placed graphs: concurrency, copies, all-reduces, alpha-beta costs."""

from __future__ import annotations

import numpy as np
import pytest

from backends.costmodel.price import price
from backends.costmodel.profiles import ARRule, load_engine
from hardware.profiles import resolve_system
from backends.costmodel.timeline import TERMS, comm_costs, evaluate, node_costs
from graphir.builder import Builder
from graphir.graph import Graph, verify
from graphir.ops import Op
from graphir.spec import TensorSpec

H = 4096


def _two_branches(reduce: bool, rows: tuple[int, int] = (H, H)) -> Graph:
    """x on both GPUs; each multiplies by its own weight; then all-reduce, or copy 1 -> 0."""
    b = Builder()
    b.leaf(Op.INPUT, "x", TensorSpec(("T", H), "f32"), device="cuda:0", role="x")
    b.leaf(Op.INPUT, "x#1", TensorSpec(("T", H), "f32"), device="cuda:1", role="x")
    outs = []
    for k, (dev, x) in enumerate((("cuda:0", "x"), ("cuda:1", "x#1"))):
        w = b.leaf(Op.WEIGHT, f"w#{k}", TensorSpec((rows[k], H), "q4_0"), device=dev)
        y = b.emit(Op.MATMUL, f"y#{k}", x, w, device=dev)
        outs.append(b.emit(Op.MATMUL, f"z#{k}", y, b.leaf(Op.WEIGHT, f"v#{k}", TensorSpec((H, rows[k]), "q4_0"),
                                                          device=dev), device=dev))
    if reduce:
        r = b.emit(Op.ALL_REDUCE, "sum", *outs, device="cuda:0,cuda:1")
    else:
        c = b.emit(Op.COPY, "z#1.copy0", outs[1], device="cuda:0")
        r = b.emit(Op.ADD, "sum", outs[0], c, device="cuda:0")
    b.emit(Op.OUTPUT, "out", r, device="cuda:0" if not reduce else None, key="out")
    g = b.graph(phase="tg")
    if reduce:  # the output of a collective lives on its group; read it on cuda:0
        nodes = list(g.nodes)
        nodes[-1] = nodes[-1].with_(device="cuda:0")
        g = g.replace_nodes(nodes)
    verify(g)
    return g


def _setup() -> tuple:
    return resolve_system("2x3090"), load_engine("ik_llama.cpp")


def test_devices_run_concurrently_and_reduce_synchronises() -> None:
    sysm, eng = _setup()
    g = _two_branches(True, (H, H))
    pr = price(g)
    kv = np.array([0.0])
    cost, _ = node_costs(pr, sysm, eng, kv)
    per_dev = [cost[pr.dev == d].sum() for d in (0, 1)]
    xfer, over = comm_costs(pr, sysm, eng)
    tl = evaluate(pr, sysm, eng, kv)
    expect = max(per_dev) + xfer[0] + over[0] + eng.forward_us * 1e-6
    assert tl.total[0] == pytest.approx(expect)
    assert tl.terms[:, 0].sum() == pytest.approx(tl.total[0])  # the breakdown sums to the time
    # a slower branch on one device sets the pace of both
    slow = price(_two_branches(True, (H, 4 * H)))
    assert evaluate(slow, sysm, eng, kv).total[0] > tl.total[0]


def test_copy_waits_for_its_value_and_costs_alpha_beta() -> None:
    sysm, eng = _setup()
    pr = price(_two_branches(False))
    xfer, over = comm_costs(pr, sysm, eng)
    link = sysm.link
    nbytes = H * 4  # one token, f32
    hops = 1 if link.p2p or eng.staged_copy == "pipelined" else 2
    # ik's scheduler copies through host memory: a fraction of the bus rate, P2P or not
    beta = link.bw_GBps * 1e9 * eng.copy_bw_eff if eng.copy_bw_eff is not None else link.beta * eng.comm_bw_eff
    assert xfer[0] == pytest.approx(hops * (link.latency_us * 1e-6 + nbytes / beta))
    assert over[0] == pytest.approx(eng.copy_us * 1e-6)
    tl = evaluate(pr, sysm, eng, np.array([0.0]))
    assert tl.terms[TERMS.index("comm"), 0] == pytest.approx(xfer[0])


def test_all_reduce_cost_per_algorithm() -> None:
    sysm, eng = _setup()
    pr = price(_two_branches(True), None)
    a, beta = sysm.link.latency_us * 1e-6, sysm.link.beta * eng.comm_bw_eff
    # TG: 1 token, partials travel as f32 below reduce_f16_min_tokens
    ring = eng.model_copy(update={"allreduce": (ARRule(algo="ring"),)})
    xfer, over = comm_costs(pr, sysm, ring)
    assert xfer[0] == pytest.approx(2 * a + 2 * 1 / 2 * H * 4 / beta)
    assert over[0] == pytest.approx(eng.allreduce_us * 1e-6)
    # ik with NCCL on two GPUs: NCCL's ring, its latency in the call's fixed cost (allreduce_us)
    assert eng.ar_algo(2, 1, sysm.link.p2p) == "nccl"
    xfer, over = comm_costs(pr, sysm, eng)
    assert xfer[0] == pytest.approx(H * 4 / beta)
    assert over[0] == pytest.approx(eng.allreduce_us * 1e-6)
    # built without NCCL, a decode reduce over P2P is one kernel reading the peers
    p2p = resolve_system("2x3090-pcie4-p2p")
    no_nccl = eng.model_copy(update={"nccl": False})
    assert no_nccl.ar_algo(2, 1, True) == "one_shot" and no_nccl.ar_algo(2, 2048, True) == "ring"
    xfer, _ = comm_costs(pr, p2p, no_nccl)
    assert xfer[0] == pytest.approx(p2p.link.latency_us * 1e-6 + H * 4 / (p2p.link.beta * eng.comm_bw_eff))


def test_unplaced_graph_is_refused() -> None:
    from graphir.errors import GraphirError
    from graphir.models import BuildOptions, build
    from graphir.models.sources import load_preset

    g = build(load_preset("qwen3-0.6b").with_layers(1), BuildOptions(phase="tg"))
    with pytest.raises(GraphirError):
        price(g)


def test_host_thread_bounds_an_eager_phase_of_short_kernels() -> None:
    """host_us: one host thread walks every node of both devices; when that takes longer than
    the kernels, the forward pass takes the host's time (and 0 leaves the timeline as it was)."""
    sysm = resolve_system("2xH200")
    g = _two_branches(True, (64, 64))
    pr = price(Graph(g.nodes, (("phase", "pp"),)), 1)  # the same nodes as an eager (prefill) pass
    eng = load_engine("graphir-cuda")
    base = evaluate(pr, sysm, eng.model_copy(update={"host_us": 0.0}), np.array([0.0])).total[0]
    slow = eng.model_copy(update={"host_us": 1000.0})
    t = evaluate(pr, sysm, slow, np.array([0.0])).total[0]
    walked = pr.host_nodes.sum()  # both devices' nodes, views and leaves included
    assert walked == sum(1 for n in g.nodes if n.op not in (Op.ALL_REDUCE, Op.OUTPUT))
    assert t >= walked * 1e-3 > base
    # decode replays CUDA graphs: no host walk per node
    tg = price(_two_branches(True, (64, 64)))
    assert evaluate(tg, sysm, slow, np.array([0.0])).total[0] == pytest.approx(
        evaluate(tg, sysm, eng.model_copy(update={"host_us": 0.0}), np.array([0.0])).total[0])


def test_a_typed_all_reduce_pays_its_casts() -> None:
    sysm, eng = _setup()
    g = _two_branches(True)
    typed = g.replace_nodes([n.with_(attrs=n.attrs + (("dtype", "f16"),)) if n.op == Op.ALL_REDUCE else n
                             for n in g.nodes])
    (_, o0), (_, o1) = comm_costs(price(g), sysm, eng), comm_costs(price(typed), sysm, eng)
    assert o1[0] - o0[0] == pytest.approx(2 * eng.graph_launch_us * 1e-6)  # tg: replayed kernels


@pytest.mark.parametrize("engine", ["ik_llama.cpp", "graphir-cuda"])
@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_a_kernel_pays_its_launch_and_a_mat_vec_its_stream_time(engine: str, phase: str) -> None:
    """Per node: launches x the phase's per-launch time (graph_launch_us when replayed, else
    launch_us), plus stream_us (µs, not launches) on each weight-streaming mat-vec."""
    sysm = resolve_system("2x3090")
    g = _two_branches(True)
    pr = price(Graph(g.nodes, (("phase", phase),)), 1)  # one token: every matmul is a mat-vec
    eng = load_engine(engine)
    base = eng.model_copy(update={"launch_us": 3.0, "graph_launch_us": 1.0, "stream_us": 0.0, "gemv_us": {}})
    t0 = node_costs(pr, sysm, base, np.array([0.0]))[1][:, TERMS.index("launch"), 0]
    per = 1.0 if (eng.cuda_graphs == "tg" and phase == "tg") or eng.cuda_graphs == "always" else 3.0
    assert t0 == pytest.approx(pr.launches * per * 1e-6)
    slower = base.model_copy(update={"launch_us": 6.0, "graph_launch_us": 2.0})
    t1 = node_costs(pr, sysm, slower, np.array([0.0]))[1][:, TERMS.index("launch"), 0]
    assert t1 == pytest.approx(2 * t0)  # the launch term scales with the per-launch time
    streams = base.model_copy(update={"stream_us": 5.0})
    t2 = node_costs(pr, sysm, streams, np.array([0.0]))[1][:, TERMS.index("launch"), 0]
    gemv = np.array([op == "matmul" for op in pr.ops])
    assert t2 - t0 == pytest.approx(np.where(gemv, 5e-6, 0.0))


def test_the_engine_activation_type_sets_the_priced_bytes() -> None:
    """graphir's executor keeps activations in its compute type, ggml in f32: the graph each
    engine prices is built so (planner.predict.place_and_price), halving a norm's bytes."""
    from graphir.models.sources import load_preset
    from planner.placement import PlaceOptions
    from planner.predict import place_and_price

    cfg = load_preset("qwen3-0.6b").with_layers(2)
    po = PlaceOptions("layer", ("cuda:0",))
    assert load_engine("graphir-cuda").act_dtype == "bf16" and load_engine("ik_llama.cpp").act_dtype == "f32"
    norm = {}
    for act in ("f32", "bf16"):
        pp, _, _ = place_and_price(cfg, "bf16", "bf16", po, 512, (), act)
        i = [k for k, op in enumerate(pp.ops) if op == "rms_norm"][0]
        norm[act] = pp.actbytes[0][i]
    assert norm["bf16"] == pytest.approx(norm["f32"] / 2)
