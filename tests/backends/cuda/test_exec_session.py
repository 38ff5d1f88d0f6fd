"""Session mechanics on random weights: bounded live values, state threading, seeded weights."""

from __future__ import annotations

import pytest
import torch

from backends.cuda.runtime.session import Session, greedy
from helpers.hf_oracle import torch_threads
from backends.cuda.weights.sources import RandomWeights, WeightInfo, reference_weights
from graphir.errors import GraphirError
from graphir.models import from_hf_dict

LLAMA = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
NEXT = dict(model_type="qwen3_next", vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=8, shared_expert_intermediate_size=8, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=4, linear_value_head_dim=4, linear_conv_kernel_dim=3,
            full_attention_interval=2)
PROMPT = [5, 3, 9, 1, 1, 7, 2, 8]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("base", [LLAMA, NEXT], ids=["llama", "qwen3_next"])
def test_live_values_stay_bounded_as_layers_grow(base: dict) -> None:
    """Values die after their last use: the peak number held at once does not grow with depth."""
    peaks = []
    for n in (2, 8):
        s = Session(from_hf_dict({**base, "num_hidden_layers": n}), "random", "cpu", 16)
        s.prefill(PROMPT)
        prefill_peak = s.last_stats.peak_live
        s.decode([1])
        peaks.append((prefill_peak, s.last_stats.peak_live))
        assert s.last_stats.nodes == len(s.executed["tg"])
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize("base", [LLAMA, NEXT], ids=["llama", "qwen3_next"])
def test_state_threads_through_calls(base: dict) -> None:
    cfg = from_hf_dict(base)
    whole, gen = greedy(Session(cfg, "random", "cpu", 16, seed=3), PROMPT, 3)
    assert torch.isfinite(whole).all() and whole.shape == (len(PROMPT) + 3, 50)
    s = Session(cfg, "random", "cpu", 16, seed=3)
    rows = [s.prefill(PROMPT[:3]), s.prefill(PROMPT[3:4]), s.prefill(PROMPT[4:]), s.decode(gen)]
    torch.testing.assert_close(torch.cat(rows), whole, rtol=1e-5, atol=1e-5)
    assert s.n_past == len(PROMPT) + 3
    s.reset()  # a fresh sequence gives the first rows again
    torch.testing.assert_close(s.prefill(PROMPT), whole[: len(PROMPT)], rtol=1e-5, atol=1e-5)
    # decoding token by token equals prefilling the same tokens
    s.reset()
    s.prefill(PROMPT[:2])
    torch.testing.assert_close(s.decode(PROMPT[2:]), whole[2: len(PROMPT)], rtol=1e-5, atol=1e-5)


def test_kv_cache_is_written_in_place() -> None:
    s = Session(from_hf_dict(LLAMA), "random", "cpu", 16)
    buf = s.buffers["blk.0.cache_k"]
    ptr = buf.data_ptr()
    s.prefill(PROMPT)
    s.decode([4])
    assert s.buffers["blk.0.cache_k"].data_ptr() == ptr and buf[: len(PROMPT) + 1].abs().sum() > 0
    assert buf[len(PROMPT) + 1:].abs().sum() == 0


def test_context_limit_and_bad_tokens() -> None:
    s = Session(from_hf_dict(LLAMA), "random", "cpu", 8)
    with pytest.raises(GraphirError, match="context of 8 tokens is full"):
        s.prefill(list(range(9)))
    with pytest.raises(GraphirError, match="outside the vocabulary"):
        s.prefill([50])
    with pytest.raises(GraphirError, match="KV cache type q5_0 is not executable"):
        Session(from_hf_dict(LLAMA), "random", "cpu", 8, kv_type="q5_0")
    with pytest.raises(GraphirError, match="multiple of 32"):  # this tiny model's heads hold no whole block
        Session(from_hf_dict(LLAMA), "random", "cpu", 8, kv_type="q8_0")


def test_random_weights_are_seeded_per_tensor() -> None:
    info = WeightInfo("blk.0.attn_q.weight", (16, 32))
    a, b = RandomWeights(1).get(info), RandomWeights(1).get(info)
    assert torch.equal(a, b) and not torch.equal(a, RandomWeights(2).get(info))
    assert not torch.equal(a, RandomWeights(1).get(WeightInfo("blk.1.attn_q.weight", (16, 32))))
    assert abs(float(a.std()) - 32 ** -0.5) < 0.05
    ref = reference_weights(from_hf_dict(NEXT))
    r = RandomWeights(0)
    assert ref["blk.0.attn_norm.weight"].norm_offset == 1.0 and ref["blk.0.ssm_norm.weight"].norm_offset == 0.0
    assert float(r.get(ref["blk.0.attn_norm.weight"]).abs().mean()) < 0.2  # zero-centred: near 0
    assert abs(float(r.get(ref["blk.0.ssm_norm.weight"]).mean()) - 1) < 0.2  # plain: near 1
    assert (r.get(ref["blk.0.ssm_a"]) < 0).all()


def test_deep_random_model_stays_finite() -> None:
    for base in (LLAMA, NEXT):
        s = Session(from_hf_dict({**base, "num_hidden_layers": 24}), "random", "cpu", 16)
        out = s.prefill(PROMPT)
        assert torch.isfinite(out).all() and float(out.abs().max()) < 1e3


def test_decode_pieces_start_short_and_cover_every_node() -> None:
    from backends.cuda.capture.decode_step import _pieces
    from graphir.graph import Node
    from graphir.ops import Op
    from graphir.spec import TensorSpec

    nodes = [Node(f"n{i}", Op.ADD, (), TensorSpec((1,), "f32")) for i in range(300)]
    pieces = _pieces(nodes, 64)
    assert [len(p) for p in pieces[:4]] == [8, 16, 32, 64]  # the GPU starts after a short launch
    assert [n for p in pieces for n in p] == nodes


def test_each_session_hands_its_own_kernel_choices_to_the_kernels() -> None:
    """Timed kernel choices belong to the session (ExecContext.choices), not to the process:
    every kernel of a call sees its session's object, and two sessions do not share one."""
    from backends.cuda.reference.kernels import KERNELS
    from graphir.ops import Op

    seen: list[object] = []

    def matmul(node, args, ctx):  # the reference kernel, noting whose choices it was handed
        seen.append(ctx.choices)
        return KERNELS[Op.MATMUL](node, args, ctx)

    table = {**KERNELS, Op.MATMUL: matmul}
    a, b = (Session(from_hf_dict(LLAMA), "random", "cpu", 16, kernels=table) for _ in range(2))
    a.prefill(PROMPT)
    b.prefill(PROMPT)
    assert seen and a.choices is not b.choices
    assert {id(c) for c in seen} == {id(a.choices), id(b.choices)}
    assert set(a.choices.diagnostics()) >= {"gemv", "moe_gemv", "topk_warps", "delta_net_prefill", "nccl_failed"}
