"""The CUDA rule table (fastpath.py, fused Triton kernels, grouped MoE, SDPA attention, the
delta-net kernels) and CUDA-graph decode steps against the CPU reference kernels.

Runs on a GPU; without one it runs the Triton kernels on the CPU when Triton's interpreter
is on (TRITON_INTERPRET=1), else skips. Tests that need CUDA itself (graph capture, NCCL,
host-sync checks, two GPUs) skip without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.cuda.triton_kernels import decode_attention, deltanet_prefill, fast_moe, fused, gemv
from backends.cuda.triton_kernels import deltanet as tdn
from backends.cuda.rules.fastpath import attention as fast_attention
from backends.cuda.runtime.choices import KernelChoices
from backends.cuda.rules.rule_table import CUDA_KERNELS
from backends.cuda.capture.decode_step import DecodeStep
from backends.cuda.runtime.interp import ExecContext
from backends.cuda.reference.kernels import KERNELS
from backends.cuda.reference.recurrent import delta_rule_recurrent, raw_gates
from backends.cuda.runtime.session import Session
from helpers.hf_oracle import patch_triton_interpreter, rel_err
from graphir.builder import Builder
from graphir.models import from_hf_dict
from graphir.ops import Op
from passes import fuse
from passes import contiguous_heads, fold_shared_expert, fuse_delta_net_gates, merge_qkv, merge_siblings, merge_up_gate, place_graph, place_layer
from helpers.tiny_models import CONFIGS  # qwen3_moe normalises its routing weights: the top-k kernel writes them

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
pytestmark = pytest.mark.skipif(not (CUDA or (fused.INTERPRET and fused.triton is not None)),
                                reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEV = "cuda:0" if CUDA else "cpu"
if not CUDA:
    patch_triton_interpreter()


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEV, dtype)


def node(op: Op, name: str = "n", **attrs: object):  # a bare node to hand a rule its attributes
    from graphir.graph import Node
    from graphir.spec import TensorSpec

    return Node(name, op, (), TensorSpec((1,), "f32"), tuple(attrs.items()))


def ctx_for(g=None) -> ExecContext:
    """A context for one kernel call; `g`: the graph of its node (attention reads its inputs' cache types)."""
    from graphir.graph import Graph

    return ExecContext(g if g is not None else Graph(()), {}, {}, {}, {}, DEV)


# ---- kernels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 100), (64, 2048), (5, 16), (300, 520)])
def test_gemv_tiles_match_linear(shape: tuple[int, int]) -> None:
    N, K = shape
    x, w = rand(1, K, dtype=torch.bfloat16), rand(N, K, dtype=torch.bfloat16, seed=1)
    ref = F.linear(x.float(), w.float())
    for cfg in gemv.CONFIGS:  # every candidate tile, whichever the timing would pick
        assert rel_err(gemv._triton(x, w, cfg).float(), ref) < 1e-2


@needs_cuda
def test_gemv_choice_is_recorded_and_used() -> None:
    x, w = rand(1, 4096, dtype=torch.bfloat16), rand(2048, 4096, dtype=torch.bfloat16, seed=1)
    n = node(Op.MATMUL)
    ctx = ctx_for()
    got = CUDA_KERNELS[Op.MATMUL](n, [x, w], ctx)
    assert (2048, 4096, str(torch.bfloat16), str(w.device)) in ctx.choices.gemv  # the context's, not a global
    assert "2048x4096 torch.bfloat16" in ctx.choices.diagnostics()["gemv"]
    assert rel_err(got.float(), F.linear(x.float(), w.float())) < 1e-2


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_strided_rows(offset: float) -> None:
    x = rand(5, 3, 40)[:, :, :32]
    w = 1 + 0.1 * rand(32, seed=1)
    n = node(Op.RMS_NORM, eps=1e-6, offset=offset)
    assert rel_err(CUDA_KERNELS[Op.RMS_NORM](n, [x, w], ctx_for()), KERNELS[Op.RMS_NORM](n, [x, w], ctx_for())) < 1e-5


def test_gated_norm_swiglu_conv_rope() -> None:
    x, z, w = rand(6, 4, 32), rand(6, 4, 32, seed=1), rand(32, seed=2)
    n = node(Op.RMS_NORM_GATED, eps=1e-6)
    assert rel_err(fused.rms_norm_gated(x, z, w, 1e-6), KERNELS[Op.RMS_NORM_GATED](n, [x, z, w], ctx_for())) < 1e-5
    gu = rand(7, 2, 128)
    assert rel_err(fused.swiglu(gu[..., :64], gu[..., 64:]), F.silu(gu[..., :64]) * gu[..., 64:]) < 1e-5
    xc, wc = rand(3 + 9, 80), rand(80, 4, seed=3)
    n = node(Op.SSM_CONV, act="silu")
    assert rel_err(CUDA_KERNELS[Op.SSM_CONV](n, [xc, wc], ctx_for()), KERNELS[Op.SSM_CONV](n, [xc, wc], ctx_for())) < 1e-5
    xr, pos = rand(6, 4, 24), torch.arange(10, 16, dtype=torch.int32, device=DEV)
    n = node(Op.ROPE, n_rot=16, theta=10000.0)
    assert rel_err(CUDA_KERNELS[Op.ROPE](n, [xr, pos], ctx_for()), KERNELS[Op.ROPE](n, [xr, pos], ctx_for())) < 1e-5


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_norms_and_conv_on_prefill_sized_inputs(offset: float) -> None:
    """Many rows per program (norms) and token blocks (conv), with partial last blocks."""
    x, z, w = rand(333, 4, 48)[:, :, :40], rand(333, 4, 40, seed=1), 1 + 0.1 * rand(40, seed=2)
    n = node(Op.RMS_NORM, eps=1e-6, offset=offset)
    assert rel_err(CUDA_KERNELS[Op.RMS_NORM](n, [x, w], ctx_for()), KERNELS[Op.RMS_NORM](n, [x, w], ctx_for())) < 1e-5
    n = node(Op.RMS_NORM_GATED, eps=1e-6)
    assert rel_err(fused.rms_norm_gated(x, z, w, 1e-6), KERNELS[Op.RMS_NORM_GATED](n, [x, z, w], ctx_for())) < 1e-5
    xc, wc = rand(3 + 135, 80), rand(80, 4, seed=3)
    n = node(Op.SSM_CONV, act="silu")
    assert rel_err(CUDA_KERNELS[Op.SSM_CONV](n, [xc, wc], ctx_for()), KERNELS[Op.SSM_CONV](n, [xc, wc], ctx_for())) < 1e-5


@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_matmul(T: int, per_slot: bool) -> None:
    E, N, K, k = 8, 48, 80, 2
    x = rand(T, k, K) if per_slot else rand(T, K)
    w = rand(E, N, K, seed=1)
    ids = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(T), dtype=torch.int32).to(DEV)
    n = node(Op.MOE_MATMUL)
    want = KERNELS[Op.MOE_MATMUL](n, [x.cpu(), w.cpu(), ids.cpu()], ctx_for())
    assert rel_err(fast_moe.moe_matmul(x, w, ids).cpu(), want) < 1e-5


@needs_cuda
def test_grouped_mm_bf16() -> None:
    E, N, K, T, k = 16, 64, 128, 300, 4
    x, w = rand(T, K, dtype=torch.bfloat16), rand(E, N, K, dtype=torch.bfloat16, seed=1)
    ids = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32).to(DEV)
    want = KERNELS[Op.MOE_MATMUL](node(Op.MOE_MATMUL), [x.float(), w.float(), ids], ctx_for())
    assert rel_err(fast_moe.moe_grouped(x, w, ids), want) < 2e-2


@pytest.mark.parametrize("T", [1, 7, 64, 150])
def test_delta_net_kernels(T: int) -> None:
    nk, nv, dk, dv = 2, 4, 32, 16
    q, k, v = rand(T, nk, dk), rand(T, nk, dk, seed=1), rand(T, nv, dv, seed=2)
    g, beta = -torch.rand(T, nv, device=DEV), torch.rand(T, nv, device=DEV)
    s = rand(dk, nv, dv, seed=3)
    o, S = delta_rule_recurrent(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), s.cpu().permute(1, 0, 2))
    want = torch.cat((o, S.permute(1, 0, 2)))
    assert rel_err(tdn.delta_net(q, k, v, g, beta, s).cpu(), want) < 1e-5
    assert rel_err(tdn.delta_net_chunked(q, k, v, g, beta, s).cpu(), want) < _chunked_tol(tdn.CONFIGS[0][2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm_is_add_then_norm(dtype: torch.dtype, offset: float) -> None:
    a, b, w = rand(1, 2048, dtype=dtype), rand(1, 2048, seed=1, dtype=dtype), rand(2048, seed=2, dtype=dtype)
    total, normed = fused.add_rms_norm(a, b, w, 1e-6, offset)
    want = a + b
    ref = KERNELS[Op.RMS_NORM](node(Op.RMS_NORM, eps=1e-6, offset=offset), [want, w], ctx_for())
    tol = 0.0 if dtype == torch.float32 else 8e-3  # bf16: the interpreter truncates where torch rounds
    assert rel_err(total, want) <= tol + 1e-7 and rel_err(normed, ref) < tol + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_net_raw_gates_and_state_in_place(dtype: torch.dtype) -> None:
    """The decode kernel making g, beta from the projections, writing the state over the old one."""
    T, nk, nv, dk, dv = 1, 2, 4, 32, 16
    q, k, v = rand(T, nk, dk, dtype=dtype), rand(T, nk, dk, seed=1, dtype=dtype), rand(T, nv, dv, seed=2, dtype=dtype)
    proj = rand(T, 3 * nv, seed=4, dtype=dtype) * 4  # alpha and b as strided slices of one projection
    alpha, b = proj[:, :nv], proj[:, 2 * nv:]
    dt_bias, a = rand(nv, seed=5), -torch.rand(nv, generator=torch.Generator().manual_seed(6)).to(DEV) * 8
    s = rand(dk, nv, dv, seed=3)
    n = node(Op.DELTA_NET, qk_l2norm=True)
    g, beta = raw_gates(alpha, b, dt_bias, a)
    want = KERNELS[Op.DELTA_NET](n, [q, k, v, g, beta, s], ctx_for())
    # bf16: beta is rounded to b's type; Triton's interpreter truncates where a GPU rounds to
    # nearest, one ulp of beta (~4e-3) on some heads
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    got = tdn.delta_net(q, k, v, alpha, b, s.clone(), True, raw=(dt_bias, a))
    assert rel_err(got, want) < tol
    s2 = s.clone()
    out = tdn.delta_net(q, k, v, alpha, b, s2, True, state_out=s2, raw=(dt_bias, a))
    assert rel_err(out[:T], want[:T]) < tol and rel_err(s2, want[T:]) < tol


def _chunked_tol(ops: str) -> float:
    """tf32 / bf16 operands round on a GPU; Triton's interpreter multiplies in f32 whatever asked."""
    if ops == "bf16":
        return 5e-2
    return 2e-2 if CUDA and ops == "tf32" else 1e-4


def _delta_inputs(T: int, nk: int = 2, nv: int = 4, dk: int = 32, dv: int = 24):
    """q, k as strided bf16 views of one packed projection (as the model hands them over), v f32."""
    qk = rand(T, nk, 3 * dk, dtype=torch.bfloat16)
    q, k = qk[..., :dk], qk[..., 2 * dk:]
    v = rand(T, nv, dv, seed=2)
    g = -torch.rand(T, nv, generator=torch.Generator().manual_seed(4)).to(DEV)
    beta = torch.rand(T, nv, generator=torch.Generator().manual_seed(5)).to(DEV)
    s = rand(dk, nv, dv, seed=3)
    return q, k, v, g, beta, s


@pytest.mark.parametrize("T", [1, 63, 64, 130])
def test_delta_net_chunk_terms_fused(T: int) -> None:
    """The one-launch intra-chunk kernel against recurrent.chunk_terms (key heads shared, dv not
    a power of two, a partial last chunk)."""
    from backends.cuda.reference.recurrent import chunk_terms

    q, k, v, g, beta, _ = _delta_inputs(T)
    want = chunk_terms(*(x.cpu() for x in (q, k, v, g, beta)), True, 64)
    got = tdn.chunk_terms_fused(q, k, v, g, beta, True, 64, precision="ieee")
    for name, a, b in zip(want._fields, got, want):
        assert a.shape == b.shape, name
        assert rel_err(a.cpu(), b) < 1e-4, name


@pytest.mark.parametrize("T", [1, 63, 64, 130])
@pytest.mark.parametrize("config", [tdn.CONFIGS[0], (32, 8, "ieee", 1),
                                    pytest.param((16, 4, "bf16", 1), marks=needs_cuda)])  # interpreter: bf16 dots wrong
@pytest.mark.parametrize("prep", ["fused", "torch"])
def test_delta_net_chunked_against_recurrent(T: int, config: tuple[int, int, str, int], prep: str) -> None:
    q, k, v, g, beta, s = _delta_inputs(T)
    o, S = delta_rule_recurrent(*(x.cpu() for x in (q, k, v, g, beta)), s.cpu().permute(1, 0, 2))
    want = torch.cat((o, S.permute(1, 0, 2)))
    got = tdn.delta_net_chunked(q, k, v, g, beta, s, config=config, prep=prep)
    assert rel_err(got.cpu(), want) < _chunked_tol(config[2])


@pytest.mark.parametrize("chunk", [16, 32])  # one and two 16-row blocks in the fused inverse
def test_delta_net_chunked_other_chunks(chunk: int) -> None:
    q, k, v, g, beta, s = _delta_inputs(130)
    o, S = delta_rule_recurrent(*(x.cpu() for x in (q, k, v, g, beta)), s.cpu().permute(1, 0, 2))
    got = tdn.delta_net_chunked(q, k, v, g, beta, s, chunk=chunk, config=(32, 8, "ieee", 1))
    assert rel_err(got.cpu(), torch.cat((o, S.permute(1, 0, 2)))) < 1e-4


def test_delta_net_chunked_falls_back_when_the_fused_terms_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(tdn, "chunk_terms_fused", broken)
    q, k, v, g, beta, s = _delta_inputs(70)
    o, S = delta_rule_recurrent(*(x.cpu() for x in (q, k, v, g, beta)), s.cpu().permute(1, 0, 2))
    choices = KernelChoices()
    got = deltanet_prefill.prefill(q, k, v, g, beta, s, choices=choices)
    assert rel_err(got.cpu(), torch.cat((o, S.permute(1, 0, 2)))) < _chunked_tol(tdn.CONFIGS[0][2])
    chosen = choices.deltanet_prefill
    assert chosen["prep"] == "torch" and chosen["impl"] == "chunked" and chosen["errors"]


def _attn_graph(T: int, S: int, hq: int, hkv: int, d: int):
    b = Builder()
    q = b.leaf(Op.INPUT, "q", _spec((T, hq, d)), role="q")
    k = b.leaf(Op.INPUT, "k", _spec((S, hkv, d)), role="k")
    v = b.leaf(Op.INPUT, "v", _spec((S, hkv, d)), role="v")
    b.emit(Op.ATTENTION, "a", q, k, v, scale=d ** -0.5)
    return b.graph()


def _spec(shape):
    from graphir.spec import TensorSpec

    return TensorSpec(shape, "f32")


@pytest.mark.parametrize("T,S", [(1, 9), (5, 5), (4, 11), (70, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_sdpa(T: int, S: int, dtype: torch.dtype) -> None:
    hq, hkv, d = 8, 2, 32
    g = _attn_graph(T, S, hq, hkv, d)
    q, k, v = rand(T, hq, d, dtype=dtype), rand(S, hkv, d, dtype=dtype, seed=1), rand(S, hkv, d, dtype=dtype, seed=2)
    a = g["a"]
    want = KERNELS[Op.ATTENTION](a, [q.float().cpu(), k.float().cpu(), v.float().cpu()], ctx_for(g))
    got = fast_attention(a, [q, k, v], ExecContext(g, {}, {}, {}, {}, DEV))
    assert rel_err(got.float().cpu(), want) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_attention_bucket_mask() -> None:
    """Bucket mode: S rows of which only the first pos+1 are valid for a query at pos."""
    hq, hkv, d, S, pos = 4, 2, 16, 32, 12
    g = _attn_graph(1, S, hq, hkv, d)
    q, k, v = rand(1, hq, d), rand(S, hkv, d, seed=1), rand(S, hkv, d, seed=2)
    ctx = ExecContext(g, {}, {}, {}, {}, DEV, bucket=S, kvpos={DEV: torch.tensor([pos], device=DEV)})
    got = fast_attention(g["a"], [q, k, v], ctx)
    want = KERNELS[Op.ATTENTION](g["a"], [q.cpu(), k[:pos + 1].cpu(), v[:pos + 1].cpu()], ctx_for(g))
    assert rel_err(got.cpu(), want) < 1e-5


@pytest.mark.parametrize("hq,hkv,d,S,pos", [(16, 2, 256, 256, 0), (16, 2, 256, 256, 200), (4, 2, 16, 96, 50),
                                            (8, 8, 64, 600, 599), (6, 2, 32, 700, 333), (64, 8, 128, 4096, 3000)])
def test_decode_attention_two_launches(hq: int, hkv: int, d: int, S: int, pos: int) -> None:
    """Bucket mode, one bf16 query (a decode step): the split kernel and its combine against
    the reference over the valid rows; garbage past the position must not leak in."""
    g = _attn_graph(1, S, hq, hkv, d)
    q, k, v = (rand(*sh, dtype=torch.bfloat16, seed=i) for i, sh in enumerate([(1, hq, d), (S, hkv, d), (S, hkv, d)]))
    k[pos + 1:], v[pos + 1:] = 1e4, float("nan")  # rows not yet written
    assert decode_attention.usable_for(q, k, v)
    ctx = ExecContext(g, {}, {}, {}, {}, DEV, bucket=S, kvpos={DEV: torch.tensor([pos], device=DEV)})
    got = fast_attention(g["a"], [q, k, v], ctx)
    want = KERNELS[Op.ATTENTION](g["a"], [x.float().cpu() for x in (q, k[:pos + 1], v[:pos + 1])], ctx_for(g))
    assert got.dtype == torch.bfloat16 and got.shape == (1, hq, d)
    # bf16 rounding (scores, probabilities, output); Triton's interpreter rounds toward zero,
    # which biases every rounding the same way (a GPU rounds to nearest)
    assert rel_err(got.float().cpu(), want) < (2e-2 if CUDA else 4e-2)


# ---- sessions ---------------------------------------------------------------------------------

P1, P2 = list(range(1, 9)), [(7 * i) % 64 for i in range(70)]


MERGES = [merge_siblings, merge_qkv, merge_up_gate, contiguous_heads, fuse_delta_net_gates]  # graphir run's, less the fold
FUSIONS = MERGES + [getattr(fuse, name) for name in fuse.FUSIONS]  # and the kernel fusions after them


def _transform(cfg, split: str | None, devs: tuple[str, ...]):
    out = []
    if split == "layer":
        out.append(lambda g: place_layer(g, cfg, devs))
    elif split == "graph":
        out.append(lambda g: place_graph(g, cfg, devs, ts=(2, 1) if len(devs) == 2 else None, recurrent="split"))
    return out + FUSIONS


def _run(s: Session) -> torch.Tensor:
    return torch.cat([s.prefill(P1), s.prefill(P2), s.decode([3, 4, 5])]).cpu()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_session_fast_table_equals_reference(arch: str) -> None:
    cfg = from_hf_dict(CONFIGS[arch])
    ref = _run(Session(cfg, "random", "cpu", 128, kernels=KERNELS))
    got = _run(Session(cfg, "random", DEV, 128, kernels=CUDA_KERNELS,
                       transform=FUSIONS))
    assert rel_err(got, ref) < 1e-4


def _step_rows(step: DecodeStep, tokens: tuple[int, ...]) -> torch.Tensor:
    rows = []
    for t in tokens:
        step.step(t)
        rows.append(step.logits.float().cpu().clone())
    return torch.cat(rows)


def _steps(s: Session, capture: bool | None) -> torch.Tensor:
    s.prefill(P1)
    s.prefill(P2)
    return _step_rows(DecodeStep(s, 96, capture=capture), (3, 4, 5))


def _decode_then_restart(s: Session, tokens: list[int]) -> torch.Tensor:
    """The session's own decode of `tokens` after P1, then the session back at P1."""
    s.prefill(P1)
    want = s.decode(tokens).float().cpu()
    s.reset()
    s.prefill(P1)
    return want


@pytest.mark.parametrize("arch", ["qwen3_next", "llama"])
def test_decode_step_equals_decode(arch: str) -> None:
    cfg = from_hf_dict(CONFIGS[arch])
    s = Session(cfg, "random", DEV, 128, transform=FUSIONS,
                kernels=CUDA_KERNELS)
    s.prefill(P1)
    s.prefill(P2)
    want = s.decode([3, 4, 5]).cpu()
    s.reset()
    got = _steps(s, None)  # captured on CUDA
    assert rel_err(got, want) < 1e-5
    assert s.n_past == len(P1) + len(P2) + 3


def _fused(tg) -> dict[Op, int]:
    return {op: len(tg.by_op(op)) for op in (Op.ADD_RMS_NORM, Op.MOE_SUM_ADD_RMS_NORM, Op.MOE_SUM, Op.MOE_TOPK_WEIGHTS,
                                             Op.SWIGLU_MOE_MATMUL, Op.CAST_RMS_NORM_GATED, Op.SSM_CONV_STEP)}


@pytest.mark.skipif(DEV != "cpu", reason="logical CPU devices stand in for two GPUs (Triton's interpreter)")
@pytest.mark.parametrize("split", ["layer", "graph"])
def test_decode_step_runs_the_fused_graph_on_two_devices(split: str) -> None:
    """The fusion passes (in-place state, add+norm, the MoE ones) on a placed graph, against the
    unfused graph's decode: two logical devices, recurrent split (the conv state in three
    pieces: no in-place conv there)."""
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    devs = ("cpu:0", "cpu:1")
    placed = _transform(cfg, split, devs)  # the placement, then FUSIONS; the fold goes first of
    transform = [placed[0], fold_shared_expert, *placed[1:]]  # those, as in graphir run's passes
    s = Session(cfg, "random", devs, 128, kernels=CUDA_KERNELS, transform=transform)
    want = _decode_then_restart(Session(cfg, "random", devs, 128, kernels=CUDA_KERNELS,
                                        transform=[placed[0], fold_shared_expert, *MERGES]), [3, 4])
    s.prefill(P1)
    tg = s.executed["tg"]
    n = _fused(tg)
    assert split == "graph" or n[Op.ADD_RMS_NORM] + n[Op.MOE_SUM_ADD_RMS_NORM]  # graph: adds feed all-reduces
    assert any(d.attr.get("in_place") for d in tg.by_op(Op.DELTA_NET))
    if split == "layer":  # whole MoE layers on each device: the MoE fusions apply
        n_moe = n[Op.MOE_SUM] + n[Op.MOE_SUM_ADD_RMS_NORM]
        assert n[Op.MOE_TOPK_WEIGHTS] == n[Op.SWIGLU_MOE_MATMUL] == n_moe
        # but the last layer on cpu:0 ends in a norm on cpu:1: its sum and add stay apart
        assert n[Op.MOE_SUM_ADD_RMS_NORM] == n_moe - 1
    step = DecodeStep(s, 64, capture=False)
    assert rel_err(_step_rows(step, (3, 4)), want) < 1e-5


def test_decode_step_bf16_fusions_equal_decode() -> None:
    """bf16: the casts a gated norm folds in (f32 delta-net output -> bf16) and the add+norm
    pairs, against the unfused graph's decode (bf16 rounding, and the Triton interpreter
    truncates where a GPU rounds to nearest)."""
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    s = Session(cfg, "random", DEV, 128, dtype="bf16", kernels=CUDA_KERNELS, transform=FUSIONS)
    want = _decode_then_restart(Session(cfg, "random", DEV, 128, dtype="bf16", kernels=CUDA_KERNELS,
                                        transform=MERGES), [3, 4])
    s.prefill(P1)
    n = _fused(s.executed["tg"])
    assert n[Op.CAST_RMS_NORM_GATED] and n[Op.ADD_RMS_NORM]
    step = DecodeStep(s, 64, capture=None)
    assert rel_err(_step_rows(step, (3, 4)), want) < 3e-2


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-5), ("bf16", 3e-2)])
def test_decode_step_moe_fusions_equal_decode(dtype: str, tol: float) -> None:
    """With the shared expert folded (graphir run's passes): the top-k kernel writes the
    weights with the shared gate, the down GEMV applies the swiglu, and moe_sum, the residual
    add and the next norm are one kernel; bf16 also takes the two-launch decode attention."""
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    s = Session(cfg, "random", DEV, 128, dtype=dtype, kernels=CUDA_KERNELS, transform=[fold_shared_expert, *FUSIONS])
    want = _decode_then_restart(Session(cfg, "random", DEV, 128, dtype=dtype, kernels=CUDA_KERNELS,
                                        transform=[fold_shared_expert, *MERGES]), [3, 4])
    s.prefill(P1)
    n = _fused(s.executed["tg"])
    n_moe = n[Op.MOE_SUM_ADD_RMS_NORM]
    assert n_moe and n[Op.MOE_TOPK_WEIGHTS] == n[Op.SWIGLU_MOE_MATMUL] == n_moe and not n[Op.MOE_SUM]
    step = DecodeStep(s, 64, capture=None)
    assert rel_err(_step_rows(step, (3, 4)), want) < tol


def test_decode_step_updates_delta_net_state_in_place() -> None:
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    state_passes = [fuse.conv_in_place, fuse.delta_net_in_place, fuse.fuse_add_rms_norm]
    s = Session(cfg, "random", DEV, 128, kernels=CUDA_KERNELS, transform=state_passes)
    s.prefill(P1)
    tg = s.executed["tg"]
    n_dn = len(tg.by_op(Op.DELTA_NET))
    assert n_dn and all(d.attr.get("in_place") for d in tg.by_op(Op.DELTA_NET))  # every state qualifies
    n = _fused(tg)
    assert n[Op.SSM_CONV_STEP] == n_dn  # and every conv state shifts in place
    assert n[Op.ADD_RMS_NORM] + n[Op.MOE_SUM_ADD_RMS_NORM] >= 2 * cfg.n_layer - 1  # add + the next norm
    homes = {k: v.data_ptr() for k, v in s.state.items()}
    step = DecodeStep(s, 64, capture=False)
    step.step(3)
    assert {k: v.data_ptr() for k, v in s.state.items()} == homes  # written where a captured step reads them
    s2 = Session(cfg, "random", DEV, 128, kernels=CUDA_KERNELS)  # unfused: state copied back from the packed result
    s2.prefill(P1)
    s2.decode([3])
    assert s.state.keys() == s2.state.keys()
    for k in s.state:
        assert rel_err(s.state[k], s2.state[k]) < 1e-6, k


@needs_cuda
def test_decode_step_has_no_host_sync() -> None:
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    s = Session(cfg, "random", DEV, 128, transform=[merge_qkv, merge_up_gate])
    s.prefill(P1)
    step = DecodeStep(s, 64, capture=False)
    step.step(3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step.step()  # the eager step: every kernel of the hot path, none may wait for the host
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4)])  # bf16: a tiny random MoE flips routes on rounding
def test_two_gpus_layer_and_graph_agree(dtype: str, tol: float) -> None:
    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    devs = ("cuda:0", "cuda:1")
    one = _run(Session(cfg, "random", "cuda:0", 128, dtype=dtype, transform=[merge_qkv, merge_up_gate]))
    for split in ("layer", "graph"):
        got = _run(Session(cfg, "random", devs, 128, dtype=dtype, transform=_transform(cfg, split, devs)))
        assert rel_err(got, one) < tol, split
        s = Session(cfg, "random", devs, 128, dtype=dtype, transform=_transform(cfg, split, devs))
        assert rel_err(_steps(s, None), one[-3:]) < tol, split  # captured per device segment
