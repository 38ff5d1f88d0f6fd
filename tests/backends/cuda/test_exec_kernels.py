"""Every kernel of the rule table against plain torch or the transformers function it mirrors.

Each kernel runs through the interpreter on a one-op graph (`run_op`), so the interpreter's
spec check (shape and type with T/KV bound) applies to every case.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

from backends.cuda.reference import recurrent
from backends.cuda.reference.attention import _inv_freq
from backends.cuda.runtime.interp import ExecContext, ExecError, run_graph
from backends.cuda.reference.kernels import KERNELS
from helpers.hf_oracle import torch_threads
from helpers.ops import run_op
from graphir.builder import Builder
from graphir.ops import Op
from graphir.spec import TensorSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield



def test_every_op_has_a_kernel() -> None:
    assert set(KERNELS) == set(Op)


# ---- norms --------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_llama_and_qwen3_next(dt: torch.dtype) -> None:
    x = torch.randn(5, 3, 12).to(dt)
    w = (1 + 0.1 * torch.randn(12)).to(dt)
    ref = hf_llama.LlamaRMSNorm(12, eps=1e-5).to(dt)
    ref.weight.data.copy_(w)
    assert torch.equal(run_op(Op.RMS_NORM, x, w, eps=1e-5), ref(x))
    w0 = (0.1 * torch.randn(12)).to(dt)
    ref1 = hf_next.Qwen3NextRMSNorm(12, eps=1e-6).to(dt)
    ref1.weight.data.copy_(w0)
    assert torch.equal(run_op(Op.RMS_NORM, x, w0, eps=1e-6, offset=1.0), ref1(x))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_rms_norm_gated_matches_qwen3_next(dt: torch.dtype) -> None:
    x, z = torch.randn(4, 2, 6).to(dt), torch.randn(4, 2, 6).to(dt)
    w = (1 + 0.1 * torch.randn(6)).to(dt)
    ref = hf_next.Qwen3NextRMSNormGated(6, eps=1e-6).to(dt)
    ref.weight.data.copy_(w)
    assert torch.equal(run_op(Op.RMS_NORM_GATED, x, z, w, eps=1e-6), ref(x, z))


# ---- rope -----------------------------------------------------------------------------------

def _llama_cfg(**rope: object) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                       rope_parameters={"rope_theta": 500.0, **rope})


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 1.0},
])
def test_rope_matches_transformers(rope: dict) -> None:
    cfg = _llama_cfg(**rope)
    emb = hf_llama.LlamaRotaryEmbedding(cfg)
    x = torch.randn(7, 3, 16)
    pos = torch.arange(5, 12, dtype=torch.int32)
    cos, sin = emb(x, pos[None].long())
    q = x.transpose(0, 1)[None]  # [1,h,T,d]
    ref, _ = hf_llama.apply_rotary_pos_emb(q, q, cos, sin)
    attrs = {"n_rot": 16, "theta": 500.0}
    if rope["rope_type"] != "default":
        attrs["scaling"] = rope["rope_type"]
        for k, dst in (("factor", "factor"), ("low_freq_factor", "low_freq_factor"),
                       ("high_freq_factor", "high_freq_factor"), ("original_max_position_embeddings", "original_ctx"),
                       ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if k in rope:
                attrs[dst] = rope[k]
    got = run_op(Op.ROPE, x, pos, **attrs)
    torch.testing.assert_close(got, ref[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    assert torch.equal(_inv_freq(16, 500.0, attrs.get("scaling"), tuple(
        (k, attrs[k]) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_ctx", "beta_fast",
                                "beta_slow") if k in attrs)), emb.inv_freq)


def test_partial_rope_matches_qwen3_next() -> None:
    """Only the first n_rot dims of each head rotate (rotate_half pairing); the rest pass."""
    x = torch.randn(6, 2, 16).to(torch.bfloat16)
    pos = torch.arange(3, 9, dtype=torch.int32)
    inv = 1.0 / (1e4 ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4))
    freqs = pos.float()[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(x.dtype)[None], emb.sin().to(x.dtype)[None]
    q = x.transpose(0, 1)[None]
    ref, _ = hf_next.apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.equal(run_op(Op.ROPE, x, pos, n_rot=4, theta=1e4), ref[0].transpose(0, 1))


# ---- attention and cache -----------------------------------------------------------------------

@pytest.mark.parametrize("T,S,hq,hkv", [(5, 5, 4, 2), (1, 9, 6, 3), (3, 8, 3, 1), (4, 4, 2, 2)])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_attention_matches_eager_transformers(T: int, S: int, hq: int, hkv: int, dt: torch.dtype) -> None:
    q, k, v = torch.randn(T, hq, 8).to(dt), torch.randn(S, hkv, 8).to(dt), torch.randn(S, hkv, 8).to(dt)
    qpos = torch.arange(S - T, S)
    mask = torch.where(torch.arange(S)[None] > qpos[:, None], torch.finfo(dt).min, 0.0).to(dt)[None, None]
    mod = SimpleNamespace(num_key_value_groups=hq // hkv, training=False)
    ref, _ = hf_next.eager_attention_forward(mod, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], mask, scaling=8 ** -0.5)
    got = run_op(Op.ATTENTION, q, k, v, scale=8 ** -0.5)
    tol = 1e-6 if dt == torch.float32 else 1e-2
    torch.testing.assert_close(got, ref[0], rtol=tol, atol=tol)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                          v.transpose(0, 1).float(), attn_mask=mask[0].float() > -1,
                                          scale=8 ** -0.5, enable_gqa=True)
    torch.testing.assert_close(got.float(), sdpa.transpose(0, 1), rtol=20 * tol, atol=20 * tol)


def test_kv_append_concatenates_and_writes_in_place() -> None:
    cache, new = torch.randn(3, 2, 4), torch.randn(2, 2, 4)
    out = run_op(Op.KV_APPEND, cache, new.to(torch.bfloat16))
    assert out.dtype == torch.float32 and torch.equal(out, torch.cat([cache, new.to(torch.bfloat16).float()]))
    buf = torch.zeros(10, 2, 4)
    buf[:3] = cache
    out = run_op(Op.KV_APPEND, buf[:3], new, buffers={"c": buf}, state="c")
    assert out.data_ptr() == buf.data_ptr() and torch.equal(buf[3:5], new) and torch.equal(out, buf[:5])


# ---- recurrent --------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 6])
def test_ssm_conv_matches_causal_conv1d(T: int) -> None:
    K, C = 4, 10
    state, x, w = torch.randn(K - 1, C), torch.randn(T, C), torch.randn(C, K)
    got = run_op(Op.SSM_CONV, torch.cat([state, x]), w, act="silu")
    # transformers convolves the whole sequence with zero left padding: prepend the state rows
    ref = hf_next.causal_conv1d_fn(torch.cat([state, x]).t()[None], w, activation="silu")[0, :, K - 1:].t()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    if T == 1:  # the decode path: causal_conv1d_update keeps the last K rows as its state
        st = torch.cat([torch.zeros(C, 1), state.t()], dim=1)[None]
        upd = hf_next.causal_conv1d_update(x.t()[None].clone(), st, w, activation="silu")
        torch.testing.assert_close(got, upd[0].t(), rtol=1e-6, atol=1e-6)


def _delta_inputs(T: int, nk: int, nv: int, dk: int, dv: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(T, nk, dk, generator=g), torch.randn(T, nk, dk, generator=g)
    v = torch.randn(T, nv, dv, generator=g)
    decay = -F.softplus(torch.randn(T, nv, generator=g))
    beta = torch.sigmoid(torch.randn(T, nv, generator=g))
    state = torch.randn(dk, nv, dv, generator=g) * 0.1
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("T,nk,nv", [(1, 2, 4), (7, 1, 1), (9, 2, 2), (70, 1, 3)])
def test_delta_net_matches_transformers(T: int, nk: int, nv: int) -> None:
    dk, dv = 6, 5
    q, k, v, decay, beta, state = _delta_inputs(T, nk, nv, dk, dv)
    out = run_op(Op.DELTA_NET, q, k, v, decay, beta, state, qk_l2norm=True)
    assert out.shape == (T + dk, nv, dv) and out.dtype == torch.float32
    hf_state = state.permute(1, 0, 2)[None]  # transformers keeps [B,nv,dk,dv]
    # transformers' model repeats the key heads to the value heads before calling its delta
    # rule (some releases' rule does not take fewer key heads)
    qr, kr = q.repeat_interleave(nv // nk, dim=1), k.repeat_interleave(nv // nk, dim=1)
    for fn in (hf_next.torch_recurrent_gated_delta_rule, hf_next.torch_chunk_gated_delta_rule):
        o, s = fn(qr[None], kr[None], v[None], g=decay[None], beta=beta[None], initial_state=hf_state,
                  output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(out[:T], o[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[T:], s[0].permute(1, 0, 2), rtol=1e-5, atol=1e-5)


def test_chunked_delta_rule_equals_recurrent() -> None:
    q, k, v, decay, beta, state = _delta_inputs(150, 2, 4, 8, 3, seed=1)
    s = state.permute(1, 0, 2)
    o1, s1 = recurrent.delta_rule_recurrent(q, k, v, decay, beta, s)
    o2, s2 = recurrent.delta_rule_chunked(q, k, v, decay, beta, s, chunk=16)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


# ---- mixture of experts -----------------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False])
def test_moe_router_matches_transformers(norm: bool) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=8, num_experts=6, num_experts_per_tok=3, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(cfg)
    router.weight.data.normal_()
    x = torch.randn(5, 8)
    logits, scores, idx = router(x)
    ids = run_op(Op.MOE_TOPK, logits, k=3)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), idx)
    torch.testing.assert_close(run_op(Op.MOE_WEIGHTS, logits, ids, norm=norm), scores, rtol=0, atol=0)


def test_moe_topk_ties_resolve_like_torch_topk() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    ref = torch.topk(torch.softmax(logits, -1), 3, dim=-1).indices
    assert torch.equal(run_op(Op.MOE_TOPK, logits, k=3).long(), ref)


@pytest.mark.parametrize("xrank", [2, 3])
def test_moe_matmul_and_sum(xrank: int) -> None:
    T, k, E, N, H = 5, 2, 4, 6, 7
    ids = torch.tensor([[0, 3], [3, 1], [2, 0], [3, 2], [1, 0]], dtype=torch.int32)
    w = torch.randn(E, N, H)
    x = torch.randn(T, H) if xrank == 2 else torch.randn(T, k, H)
    xs = x[:, None].expand(T, k, H) if xrank == 2 else x
    ref = torch.einsum("tkh,tknh->tkn", xs, w[ids.long()])
    torch.testing.assert_close(run_op(Op.MOE_MATMUL, x, w, ids), ref, rtol=1e-6, atol=1e-6)
    y, wts = torch.randn(T, k, H), torch.rand(T, k)
    torch.testing.assert_close(run_op(Op.MOE_SUM, y, wts), (y * wts[..., None]).sum(1))


# ---- elementwise, views, placement ------------------------------------------------------------

def test_simple_kernels_match_torch() -> None:
    a, b, c = torch.randn(4, 6), torch.randn(6), torch.randn(4, 1)
    table, ids = torch.randn(9, 6), torch.tensor([3, 0, 8], dtype=torch.int32)
    assert torch.equal(run_op(Op.GET_ROWS, table, ids, dtype="bf16"), table[[3, 0, 8]].to(torch.bfloat16))
    w = torch.randn(5, 6)
    assert torch.equal(run_op(Op.MATMUL, a, w), F.linear(a, w))
    assert torch.equal(run_op(Op.ADD, a, b), a + b) and torch.equal(run_op(Op.MUL, a, c), a * c)
    assert torch.equal(run_op(Op.SILU, a), F.silu(a)) and torch.equal(run_op(Op.SIGMOID, a), torch.sigmoid(a))
    assert torch.equal(run_op(Op.SOFTPLUS, a), F.softplus(a))
    assert torch.equal(run_op(Op.SWIGLU, a, a.flip(0)), F.silu(a) * a.flip(0))
    assert torch.equal(run_op(Op.CAST, a, dtype="f16"), a.half())
    assert torch.equal(run_op(Op.RESHAPE, a, shape=(2, 12)), a.reshape(2, 12))
    assert torch.equal(run_op(Op.SLICE, a, dim=1, start=2, stop=5), a[:, 2:5])
    assert torch.equal(run_op(Op.CONCAT, a, a[:2], dim=0), torch.cat([a, a[:2]]))
    assert torch.equal(run_op(Op.COPY, a, node_device="cpu:1", devices=("cpu:0",)), a)


def test_all_reduce_sums_partials_on_every_device() -> None:
    p0, p1 = torch.randn(3, 4), torch.randn(3, 4)
    b = Builder()
    b.leaf(Op.INPUT, "p0", TensorSpec((3, 4), "f32"), device="cpu:0", role="test")
    b.leaf(Op.INPUT, "p1", TensorSpec((3, 4), "f32"), device="cpu:1", role="test")
    b.emit(Op.ALL_REDUCE, "s", "p0", "p1", device="cpu:0,cpu:1")
    b.emit(Op.ADD, "s1", "s", "p1", device="cpu:1")
    b.emit(Op.OUTPUT, "s.out", "s", key="s", device="cpu:0")
    b.emit(Op.OUTPUT, "s1.out", "s1", key="s1", device="cpu:1")
    g = b.graph()
    res = run_graph(g, ExecContext(g, {}, {"p0": p0, "p1": p1}, {}), KERNELS)
    assert torch.equal(res["s"], p0 + p1) and torch.equal(res["s1"], p0 + p1 + p1)
    half = run_op(Op.ALL_REDUCE, p0, p1, devices=("cpu:0", "cpu:1"), node_device="cpu:0,cpu:1", dtype="f16")
    assert isinstance(half, torch.Tensor)  # the output node reads its device's replica
    assert torch.equal(half, p0.half().float() + p1.half().float())


def test_errors_name_the_node_and_its_inputs() -> None:
    b = Builder()
    b.leaf(Op.INPUT, "in0", TensorSpec((4, 6), "f32"), role="x")
    b.leaf(Op.INPUT, "in1", TensorSpec((5, 6), "f32"), role="x")
    b.emit(Op.MATMUL, "y", "in0", "in1")
    g = b.graph()

    def broken(node: object, args: object, ctx: object) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\nsecond line")

    feeds = {"in0": torch.randn(4, 6), "in1": torch.randn(5, 6)}
    with pytest.raises(ExecError, match=r"^%y \(matmul\) on inputs \(%in0 f32\[4,6\], %in1 f32\[5,6\]\): "
                                        r"RuntimeError: mat1 and mat2 shapes cannot be multiplied$"):
        run_graph(g, ExecContext(g, {}, feeds, {}), {**KERNELS, Op.MATMUL: broken})
    feeds["in1"] = torch.randn(5, 7)  # a value that breaks its spec is caught where it appears
    with pytest.raises(ExecError, match=r"%in1 \(input\) produced f32\[5,7\], its spec is f32\[5,6\]"):
        run_graph(g, ExecContext(g, {}, feeds, {}), KERNELS)
