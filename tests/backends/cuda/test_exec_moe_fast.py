"""The MoE fast paths (fast_moe.py, moe_router.py and the MoE rules of fastpath.py) against the reference
kernels: the router's top-k + routing-weights kernel (moe_topk_weights), moe_sum, the decode GEMV and the
prefill path with the route its matmuls share (moe_route).

Runs on a GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skips where
neither is available. On the CPU the prefill path takes the padded-bmm fallback
(_grouped_mm needs Hopper), which still exercises the routing, the row gather and scatter.
"""

from __future__ import annotations

import pytest
import torch

from backends.cuda.triton_kernels import fast_moe, fused, moe_router
from backends.cuda.rules.rule_table import CUDA_KERNELS
from backends.cuda.runtime.interp import ExecContext
from backends.cuda.reference.kernels import KERNELS
from helpers.hf_oracle import patch_triton_interpreter, rel_err
from graphir.graph import Graph, Node
from graphir.ops import Op
from graphir.spec import TensorSpec

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (CUDA or (fused.INTERPRET and fused.triton is not None)),
                                reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")
DEV = "cuda:0" if CUDA else "cpu"
if not CUDA:
    patch_triton_interpreter()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed)).to(DEV, dtype)


def distinct_logits(T: int, E: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[T,E] logits without ties in any type: each row a permutation of (n - E/2) / 64, exact
    in bf16 while |n| <= 256 (E <= 512)."""
    g = gen(seed)
    rows = [(torch.randperm(E, generator=g).float() - E // 2) / 64 for _ in range(T)]
    return torch.stack(rows).to(DEV, dtype)


def random_ids(T: int, k: int, E: int, seed: int = 0) -> torch.Tensor:
    """[T,k] i32: k distinct experts per token, as a router picks them."""
    g = gen(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEV, torch.int32)


def mk(name: str, op: Op, inputs: tuple[str, ...] = (), **attrs: object) -> Node:
    return Node(name, op, inputs, TensorSpec((1,), "f32"), tuple(attrs.items()))


def ctx_for() -> ExecContext:
    return ExecContext(Graph(()), {}, {}, {}, {}, DEV)


CASES = [(E, k) for E in (8, 512) for k in (1, 2, 10) if k <= E]


# ---- router ---------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_and_weights_match_reference(T: int, E: int, k: int, dtype: torch.dtype) -> None:
    logits = distinct_logits(T, E, dtype, seed=T + E + k)
    topk, wnode = mk("ids", Op.MOE_TOPK, ("logits",), k=k), mk("w", Op.MOE_WEIGHTS, ("logits", "ids"), norm=True)
    ctx = ctx_for()
    assert moe_router.topk_ok(logits, k)
    ids = CUDA_KERNELS[Op.MOE_TOPK](topk, [logits], ctx)
    want_ids = KERNELS[Op.MOE_TOPK](topk, [logits.cpu()], ctx_for())
    assert ids.dtype == torch.int32 and ids.shape == (T, k)
    assert torch.equal(ids.cpu(), want_ids)  # no ties: the same experts, largest first
    w = CUDA_KERNELS[Op.MOE_WEIGHTS](wnode, [logits, ids], ctx)
    want_w = KERNELS[Op.MOE_WEIGHTS](wnode, [logits.cpu(), want_ids], ctx_for())
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T", [1, 40])
@pytest.mark.parametrize("m", [0, 1])
def test_fused_topk_weights_equal_the_two_nodes(T: int, m: int) -> None:
    """moe_topk_weights (passes/fuse.py): the ids and routing weights of one launch are those
    of the reference top-k and moe_weights {norm} nodes it replaces."""
    E, k = 32, 4
    logits = distinct_logits(T, E, torch.float32, seed=T + m)
    gate = rand(T, 1, seed=3)
    node = Node("f", Op.MOE_TOPK_WEIGHTS, ("logits", "gate")[:1 + (m > 0)],
                TensorSpec((T, k + m), "i32"), tuple({"k": k, **({"shared": m} if m else {})}.items()),
                outs=(TensorSpec((T, k + m), "f32"),))
    args = [logits, gate][:1 + (m > 0)]
    ids, w = CUDA_KERNELS[Op.MOE_TOPK_WEIGHTS](node, args, ctx_for())
    want_ids, want_w = KERNELS[Op.MOE_TOPK_WEIGHTS](node, [a.cpu() for a in args], ctx_for())
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-6, atol=1e-7)
    # and the top-k node alone still gives its ids, with nothing handed on in the context
    ctx = ctx_for()
    plain = CUDA_KERNELS[Op.MOE_TOPK](mk("ids", Op.MOE_TOPK, ("logits",), k=k, **({"shared": m} if m else {})),
                                      [logits], ctx)
    assert torch.equal(plain.cpu(), want_ids) and not ctx.cache


def test_topk_strided_logits() -> None:
    wide = distinct_logits(4, 40, torch.float32)
    logits = wide[:, 5:37]  # a slice of a wider row: strided rows, unit-stride columns
    ids = CUDA_KERNELS[Op.MOE_TOPK](mk("ids", Op.MOE_TOPK, ("l",), k=3), [logits], ctx_for())
    assert torch.equal(ids.cpu().long(), torch.topk(logits.cpu(), 3).indices)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at each value of x (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_topk_and_weights_match_reference(T: int, m: int, dtype: torch.dtype) -> None:
    """A folded shared expert: m slots after the k routed ones, ids E.., weights sigmoid(gate)."""
    E, k = 32, 10
    logits = distinct_logits(T, E, dtype, seed=T + m)
    gate = rand(T, 1, dtype=dtype, seed=5) * 3  # both signs, sigmoid well away from 0 and 1
    topk = mk("ids", Op.MOE_TOPK, ("logits",), k=k, shared=m)
    wnode = mk("w", Op.MOE_WEIGHTS, ("logits", "ids", "gate"), norm=True, shared=m)
    ctx = ctx_for()
    ids = CUDA_KERNELS[Op.MOE_TOPK](topk, [logits], ctx)
    want_ids = KERNELS[Op.MOE_TOPK](topk, [logits.cpu()], ctx_for())
    assert ids.dtype == torch.int32 and ids.shape == (T, k + m)
    assert torch.equal(ids.cpu(), want_ids)
    assert torch.equal(ids[:, k:].cpu(), torch.arange(E, E + m, dtype=torch.int32).expand(T, m))
    w = CUDA_KERNELS[Op.MOE_WEIGHTS](wnode, [logits, ids, gate], ctx)
    want = KERNELS[Op.MOE_WEIGHTS](wnode, [logits.cpu(), want_ids, gate.cpu()], ctx_for())
    assert w.dtype == torch.float32 and w.shape == (T, k + m)
    torch.testing.assert_close(w[:, :k].cpu(), want[:, :k], rtol=1e-6, atol=1e-7)
    # the routed part is exactly the unshared routing weights
    plain = KERNELS[Op.MOE_WEIGHTS](mk("w", Op.MOE_WEIGHTS, norm=True), [logits.cpu(), want_ids[:, :k]], ctx_for())
    torch.testing.assert_close(want[:, :k], plain, rtol=0, atol=0)
    sig = torch.sigmoid(gate.cpu()).float().expand(T, m)
    assert torch.equal(want[:, k:], sig)
    if dtype == torch.float32:
        torch.testing.assert_close(w[:, k:].cpu(), sig, rtol=1e-6, atol=1e-7)
    else:  # rounded to bf16 as torch.sigmoid on bf16 rounds: at most one ulp apart
        assert bool(((w[:, k:].cpu() - sig).abs() <= _bf16_ulp(sig)).all())


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The same values but for the order of a sum the compiler may change: f32 within 1e-6
    relative, 16-bit types within one ulp of their type."""
    g, w = got.float().cpu(), want.float().cpu()
    if got.dtype == torch.float32:
        return bool(((g - w).abs() <= 1e-6 * w.abs().max()).all())
    return bool(((g - w).abs() <= _bf16_ulp(w)).all())


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_with_gate_writes_the_shared_weights(T: int, dtype: torch.dtype) -> None:
    """The decode step's fused router: ids and every weight (routed softmax, shared sigmoid)
    from one launch, bit for bit what the top-k and selected-softmax kernels give apart. The
    gate is the merged router product's last column, as after the fold and merge_siblings."""
    E, k, m = 32, 10, 1
    wide = distinct_logits(T, E + 1, dtype, seed=7)
    logits, gate = wide[:, :E], wide[:, E:]
    ids, w = moe_router.topk_softmax(logits, k, m, gate)
    want_ids, none = moe_router.topk_softmax(logits, k, m)
    assert none is None and torch.equal(ids, want_ids)
    assert w is not None and w.shape == (T, k + m) and w.dtype == torch.float32
    assert torch.equal(w, moe_router.selected_softmax(logits, want_ids, gate, m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,config", [(512, None), (96, None), (96, (16, 64, 4)), (80, (8, 32, 2))])
def test_gemv_reads_swiglu_as_it_loads(dtype: torch.dtype, K: int, config: tuple[int, int, int] | None) -> None:
    """moe_gemv(g, up=u) is moe_gemv(swiglu(g, u)) (the down projection after the gate/up
    product, whose halves are strided views of one tensor), masked tiles included."""
    T, k, E, N = 1, 3, 8, 48
    gu = rand(T, k, 2 * K, dtype=dtype, seed=3)
    g, u = gu[..., :K], gu[..., K:]
    w = rand(E, N, K, dtype=dtype, seed=4)
    ids = random_ids(T, k, E, seed=5)
    want = fast_moe.moe_gemv(fused.swiglu(g, u), w, ids, config)
    got = fast_moe.moe_gemv(g, w, ids, config, up=u)
    assert got.dtype == dtype and _close(got, want)


@pytest.mark.parametrize("T,k,H", [(1, 11, 64), (1, 3, 100), (2, 4, 2048)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_add_rms_norm_is_sum_add_norm(T: int, k: int, H: int, offset: float, dtype: torch.dtype) -> None:
    """The layer end of a decode step in one launch: moe_sum, the residual add, the norm."""
    a, y = rand(T, H, dtype=dtype, seed=1), rand(T, k, H, dtype=dtype, seed=2)
    wk, w = torch.rand(T, k, generator=gen(3)).to(DEV), rand(H, dtype=dtype, seed=4)
    total, normed = moe_router.moe_add_rms_norm(a, y, wk, w, 1e-6, offset)
    want_total, want_normed = fused.add_rms_norm(a, moe_router.moe_sum(y, wk), w, 1e-6, offset)
    assert total.dtype == normed.dtype == dtype
    assert _close(total, want_total) and _close(normed, want_normed)
    with pytest.raises(ValueError, match="moe_add_rms_norm wants"):
        moe_router.moe_add_rms_norm(a[:, :-1], y, wk, w, 1e-6, offset)


def test_shared_weights_strided_gate() -> None:
    """The gate is a [T,1] column of a merged router product (merge_siblings after the fold)."""
    T, E, k = 5, 16, 4
    wide = rand(T, E + 1, seed=2)
    logits, gate = wide[:, :E], wide[:, E:]
    ids = CUDA_KERNELS[Op.MOE_TOPK](mk("ids", Op.MOE_TOPK, ("l",), k=k, shared=1), [logits], ctx_for())
    wnode = mk("w", Op.MOE_WEIGHTS, ("l", "ids", "g"), norm=True, shared=1)
    got = CUDA_KERNELS[Op.MOE_WEIGHTS](wnode, [logits, ids, gate], ctx_for())
    want = KERNELS[Op.MOE_WEIGHTS](wnode, [logits.cpu(), ids.cpu(), gate.cpu()], ctx_for())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T", [1, 37])
def test_shared_slots_through_the_expert_kernels(T: int) -> None:
    """k+m slots over E+m experts: the decode GEMV (T=1), the grouped prefill path and moe_sum."""
    E, k, m, H, N = 32, 10, 2, 64, 16
    x = rand(T, H)
    w_up, w_down = rand(E + m, N, H, seed=1), rand(E + m, H, N, seed=2)
    topk = mk("ids", Op.MOE_TOPK, ("logits",), k=k, shared=m)
    ids = CUDA_KERNELS[Op.MOE_TOPK](topk, [distinct_logits(T, E, torch.float32, seed=3)], ctx_for())
    up, down = mk("up", Op.MOE_MATMUL, ("x", "w_up", "ids")), mk("down", Op.MOE_MATMUL, ("h", "w_down", "ids"))
    ctx = ctx_for()
    h = CUDA_KERNELS[Op.MOE_MATMUL](up, [x, w_up, ids], ctx)
    y = CUDA_KERNELS[Op.MOE_MATMUL](down, [h, w_down, ids], ctx)
    ref = KERNELS[Op.MOE_MATMUL]
    want_h = ref(up, [x.cpu(), w_up.cpu(), ids.cpu()], ctx_for())
    want_y = ref(down, [want_h, w_down.cpu(), ids.cpu()], ctx_for())
    assert y.shape == (T, k + m, H) and rel_err(y.cpu(), want_y) < 1e-5
    wts = torch.rand(T, k + m, generator=gen(4)).to(DEV)
    s = mk("s", Op.MOE_SUM, ("y", "w"))
    got = CUDA_KERNELS[Op.MOE_SUM](s, [y, wts], ctx_for())
    assert rel_err(got.cpu(), KERNELS[Op.MOE_SUM](s, [want_y, wts.cpu()], ctx_for())) < 1e-5


# ---- weighted sum ---------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("k", [1, 2, 10])
@pytest.mark.parametrize("H", [64, 100])
# bf16: Triton's interpreter rounds f32 -> bf16 toward zero (the GPU to nearest): one ulp apart
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_moe_sum(T: int, k: int, H: int, dtype: torch.dtype, tol: float) -> None:
    y, w = rand(T, k, H, dtype=dtype), torch.rand(T, k, generator=gen(1)).to(DEV)
    n = mk("s", Op.MOE_SUM, ("y", "w"))
    got = CUDA_KERNELS[Op.MOE_SUM](n, [y, w], ctx_for())
    want = KERNELS[Op.MOE_SUM](n, [y.cpu(), w.cpu()], ctx_for())
    assert got.dtype == dtype and got.shape == (T, H)
    assert rel_err(got.cpu(), want) < tol


# ---- decode GEMV ----------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("N,K", [(48, 80), (64, 512), (32, 1024)])
def test_decode_gemv(T: int, E: int, k: int, per_slot: bool, N: int, K: int) -> None:
    x = rand(T, k, K) if per_slot else rand(T, K)
    w = rand(E, N, K, seed=1)
    ids = random_ids(T, k, E, seed=2)
    n = mk("m", Op.MOE_MATMUL, ("x", "w", "ids"))
    want = KERNELS[Op.MOE_MATMUL](n, [x.cpu(), w.cpu(), ids.cpu()], ctx_for())
    assert rel_err(CUDA_KERNELS[Op.MOE_MATMUL](n, [x, w, ids], ctx_for()).cpu(), want) < 1e-5


@pytest.mark.parametrize("config", [(16, 64, 4), (32, 128, 4), (8, 512, 8), (64, 32, 2), (16, 32, 4, 3)])
def test_decode_gemv_configs(config: tuple[int, int, int]) -> None:
    x, w = rand(2, 96, dtype=torch.bfloat16), rand(8, 40, 96, dtype=torch.bfloat16, seed=1)
    ids = random_ids(2, 2, 8)
    want = KERNELS[Op.MOE_MATMUL](mk("m", Op.MOE_MATMUL), [x.float().cpu(), w.float().cpu(), ids.cpu()], ctx_for())
    got = fast_moe.moe_gemv(x, w, ids, config)
    assert got.dtype == torch.bfloat16 and rel_err(got.cpu(), want) < 1e-2


# ---- prefill: routing once per ids node -------------------------------------------------------

def test_route_sorts_stably() -> None:
    ids = random_ids(30, 3, 8, seed=3)
    r = fast_moe.route(ids, 8)
    flat = ids.reshape(-1).long().cpu()
    assert torch.equal(r.order.cpu(), torch.argsort(flat, stable=True))
    assert r.ends.dtype == torch.int32
    assert torch.equal(r.ends.cpu().long(), torch.cumsum(torch.bincount(flat, minlength=8), 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_gather_scatter(dtype: torch.dtype) -> None:
    src = rand(12, 70, dtype=dtype)
    idx = torch.randperm(36, generator=gen(4)).to(DEV)
    got = fast_moe._rows(src, idx, 3, torch.float32, scatter=False)
    assert torch.equal(got.cpu(), src.float().cpu()[idx.cpu() // 3])
    rows = rand(36, 70, dtype=dtype, seed=5)  # widened on the way (narrowing rounds differently in the interpreter)
    got = fast_moe._rows(rows, idx, 1, torch.float32, scatter=True)
    want = torch.empty_like(rows.cpu()).index_copy_(0, idx.cpu(), rows.cpu()).float()
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefill_shared_route(E: int, k: int, dtype: torch.dtype, tol: float) -> None:
    T = 160 // k + 1  # T*k > DECODE_SLOTS: the grouped path
    H, N = 64, 48
    assert T * k > fast_moe.DECODE_SLOTS
    x = rand(T, H, dtype=dtype)
    w_up, w_down = rand(E, 2 * N, H, dtype=dtype, seed=1), rand(E, H, N, dtype=dtype, seed=2)
    ids = random_ids(T, k, E, seed=3)
    up = mk("up", Op.MOE_MATMUL_ROUTED, ("x", "w_up", "ids", "order", "ends"))
    down = mk("down", Op.MOE_MATMUL_ROUTED, ("h", "w_down", "ids", "order", "ends"))
    ctx = ctx_for()
    order, ends = CUDA_KERNELS[Op.MOE_ROUTE](mk("route", Op.MOE_ROUTE, ("ids",), experts=E), [ids], ctx)
    want_route = KERNELS[Op.MOE_ROUTE](mk("route", Op.MOE_ROUTE, ("ids",), experts=E), [ids.cpu()], ctx_for())
    assert torch.equal(order.cpu(), want_route[0]) and torch.equal(ends.cpu(), want_route[1])
    g = CUDA_KERNELS[Op.MOE_MATMUL_ROUTED](up, [x, w_up, ids, order, ends], ctx)  # [T,k,2N]
    h = g[..., :N] * g[..., N:]  # a strided [T,k,N] per-slot input
    y = CUDA_KERNELS[Op.MOE_MATMUL_ROUTED](down, [h, w_down, ids, order, ends], ctx)  # [T,k,H]
    assert not ctx.cache  # the route is a value of the graph, not something kept in the context
    assert g.dtype == dtype and y.dtype == dtype and y.shape == (T, k, H)
    # the same as routing afresh in each call
    assert torch.equal(g, fast_moe.moe_grouped(x, w_up, ids))
    assert torch.equal(y, fast_moe.moe_grouped(h, w_down, ids))
    # and as the reference kernel (f32)
    ref = KERNELS[Op.MOE_MATMUL]
    plain_up, plain_down = mk("up", Op.MOE_MATMUL, ("x", "w_up", "ids")), mk("down", Op.MOE_MATMUL, ("h", "w_down", "ids"))
    want_g = ref(plain_up, [x.float().cpu(), w_up.float().cpu(), ids.cpu()], ctx_for())
    want_y = ref(plain_down, [h.float().cpu(), w_down.float().cpu(), ids.cpu()], ctx_for())
    assert rel_err(g.cpu(), want_g) < tol
    assert rel_err(y.cpu(), want_y) < tol


def test_prefill_graph_routes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through run_graph: after share_moe_route, two moe_matmuls over one ids node read one route."""
    from graphir.builder import Builder
    from passes.fuse import share_moe_route

    E, k, T, H, N = 8, 2, 50, 32, 24
    vals = {"x": rand(T, H), "w_up": rand(E, N, H, seed=1), "w_down": rand(E, H, N, seed=2),
            "ids": random_ids(T, k, E, seed=3)}
    b = Builder()
    names = {n: b.leaf(Op.INPUT, n, TensorSpec(tuple(v.shape), "i32" if n == "ids" else "f32"), role="test")
             for n, v in vals.items()}
    up = b.emit(Op.MOE_MATMUL, "up", names["x"], names["w_up"], names["ids"])
    down = b.emit(Op.MOE_MATMUL, "down", up, names["w_down"], names["ids"])
    b.emit(Op.OUTPUT, "y.out", down, key="y")
    g = share_moe_route(b.graph(phase="pp"))
    assert len(g.by_op(Op.MOE_ROUTE)) == 1 and len(g.by_op(Op.MOE_MATMUL_ROUTED)) == 2
    calls = []
    real = fast_moe.route
    monkeypatch.setattr(fast_moe, "route", lambda ids, n: calls.append(n) or real(ids, n))
    from backends.cuda.runtime.interp import run_graph

    ctx = ExecContext(g, {}, vals, {}, {}, DEV)
    got = run_graph(g, ctx, CUDA_KERNELS)["y"]
    assert calls == [E]
    cpu = {n: v.cpu() for n, v in vals.items()}
    want = run_graph(g, ExecContext(g, {}, cpu, {}, {}), KERNELS)["y"]
    assert rel_err(got.cpu(), want) < 1e-5


# ---- a folded shared expert end to end ------------------------------------------------------

def test_folded_shared_expert_session() -> None:
    """Qwen3-Next with its shared expert folded (and merged after) through the fast paths: the
    reference kernels' logits of the unfolded graph (f32)."""
    from backends.cuda.runtime.session import Session, greedy
    from graphir.models import from_hf_dict
    from passes import PassContext, run_pipeline

    cfg = from_hf_dict(dict(model_type="qwen3_next", vocab_size=50, hidden_size=32, intermediate_size=36,
                            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                            shared_expert_intermediate_size=16, linear_num_key_heads=2, linear_num_value_heads=4,
                            linear_key_head_dim=4, linear_value_head_dim=4, linear_conv_kernel_dim=3,
                            full_attention_interval=2))
    prompt = [5, 3, 9, 1, 1]
    ref, gen = greedy(Session(cfg, "random", "cpu", 16, seed=7, kernels=KERNELS), prompt, 3)
    pipe = ("fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate")
    pctx = PassContext(cfg=cfg, devices=(DEV,))
    s = Session(cfg, "random", DEV, 16, seed=7, kernels=CUDA_KERNELS,
                transform=lambda g: run_pipeline(g, pipe, pctx).graph)
    assert all(n.attr.get("shared") == 2 for n in s.executed["tg"].by_op(Op.MOE_TOPK))
    got = torch.cat([s.prefill(prompt), s.decode(gen)]).cpu()
    assert rel_err(got, ref) < 1e-4
