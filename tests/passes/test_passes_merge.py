"""merge_qkv / merge_up_gate: the expected rewrite, the type rules, per-device merges, and
outputs unchanged when executed."""

from __future__ import annotations

import pytest
import torch

from graphir.dtypes import dtype
from graphir.graph import verify
from graphir.models import BuildOptions, ModelConfig, build
from graphir.ops import Op
from graphir.quant import per_tensor, uniform
from graphir.text import format_node
from passes import merge_qkv, merge_up_gate, place_graph, verify_placed
from helpers.passes_common import session_class, tiny_opts

Session = session_class()

LLAMA = ModelConfig(arch="llama", name="tiny", vocab_size=32, hidden_size=16, n_layer=1, n_head=4, n_kv_head=2,
                    head_dim=4, intermediate_size=24, torch_dtype="float32")
MOE = ModelConfig(arch="qwen3_next", name="tiny-next", vocab_size=32, hidden_size=32, n_layer=2, n_head=4,
                  n_kv_head=2, head_dim=8, intermediate_size=32, partial_rotary_factor=0.5, n_expert=4,
                  n_expert_used=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                  layer_types=("linear_attention", "full_attention"), linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                  linear_conv_kernel_dim=4, torch_dtype="float32")


def _lines(g, names):  # type: ignore[no-untyped-def]
    return [format_node(g[n]) for n in names]


def test_merge_qkv_before_and_expected() -> None:
    g = build(LLAMA, tiny_opts())
    before = _lines(g, ["blk.0.attn_q.weight", "blk.0.attn_q", "blk.0.attn_k.weight", "blk.0.attn_k",
                        "blk.0.attn_v.weight", "blk.0.attn_v"])
    assert before == [
        "%blk.0.attn_q.weight : f32[16,16] = weight()",
        "%blk.0.attn_q : f32[T,16] = matmul(%blk.0.attn_norm, %blk.0.attn_q.weight)",
        "%blk.0.attn_k.weight : f32[8,16] = weight()",
        "%blk.0.attn_k : f32[T,8] = matmul(%blk.0.attn_norm, %blk.0.attn_k.weight)",
        "%blk.0.attn_v.weight : f32[8,16] = weight()",
        "%blk.0.attn_v : f32[T,8] = matmul(%blk.0.attn_norm, %blk.0.attn_v.weight)",
    ]
    m = merge_qkv(g)
    verify(m)
    start = [n.name for n in m.nodes].index("blk.0.attn_q.weight")
    assert [format_node(n) for n in m.nodes[start:start + 8]] == [
        "%blk.0.attn_q.weight : f32[16,16] = weight()",
        "%blk.0.attn_k.weight : f32[8,16] = weight()",
        "%blk.0.attn_v.weight : f32[8,16] = weight()",
        "%blk.0.attn_qkv.weight : f32[32,16] = concat(%blk.0.attn_q.weight, %blk.0.attn_k.weight, "
        "%blk.0.attn_v.weight) {dim=0}",
        "%blk.0.attn_qkv : f32[T,32] = matmul(%blk.0.attn_norm, %blk.0.attn_qkv.weight)",
        "%blk.0.attn_q : f32[T,16] = slice(%blk.0.attn_qkv) {dim=1, start=0, stop=16}",
        "%blk.0.attn_k : f32[T,8] = slice(%blk.0.attn_qkv) {dim=1, start=16, stop=24}",
        "%blk.0.attn_v : f32[T,8] = slice(%blk.0.attn_qkv) {dim=1, start=24, stop=32}",
    ]
    assert len(m) == len(g) + 2 and merge_qkv(m) == m  # idempotent
    assert m.outputs().keys() == g.outputs().keys()


def test_merge_qkv_needs_equal_types_else_q_and_k_only() -> None:
    q8, f16 = dtype("q8_0"), dtype("f16")
    types = {"blk.0.attn_q.weight": q8, "blk.0.attn_k.weight": q8, "blk.0.attn_v.weight": f16}
    g = build(LLAMA, BuildOptions(quant=per_tensor(types, uniform("f32"))))
    m = merge_qkv(g)
    verify(m)
    assert m["blk.0.attn_qk.weight"].inputs == ("blk.0.attn_q.weight", "blk.0.attn_k.weight")
    assert m["blk.0.attn_v"].op == Op.MATMUL
    types["blk.0.attn_k.weight"] = f16
    g2 = build(LLAMA, BuildOptions(quant=per_tensor(types, uniform("f32"))))
    assert merge_qkv(g2) is g2  # nothing shares a type with Q


def test_merge_up_gate_covers_dense_shared_and_routed_experts() -> None:
    g = build(MOE, tiny_opts())
    m = merge_up_gate(g)
    verify(m)
    w = m["blk.0.ffn_gate_up_exps.weight"]
    assert w.op == Op.CONCAT and w.attr["dim"] == 1 and w.spec.shape == (4, 64, 32)
    assert m["blk.0.ffn_gate_up_exps"].op == Op.MOE_MATMUL
    assert m["blk.0.ffn_up_exps"].op == Op.SLICE and m["blk.0.ffn_up_exps"].attr["dim"] == 2
    assert m["blk.1.ffn_gate_up_shexp"].op == Op.MATMUL
    dense = merge_up_gate(build(LLAMA, tiny_opts()))
    assert dense["blk.0.ffn_gate"].op == Op.SLICE and dense["blk.0.ffn_gate"].attr["stop"] == 24


def test_merges_after_graph_split_merge_each_device_slice() -> None:
    devs = ("cpu:0", "cpu:1")
    placed = place_graph(build(MOE, tiny_opts()), MOE, devs, recurrent="split")
    after = merge_up_gate(merge_qkv(placed))
    verify_placed(after)
    for k, d in enumerate(devs):
        w = after[f"blk.1.attn_qkv.weight#{k}"]
        assert w.device == d and w.inputs == tuple(f"blk.1.attn_{r}.weight#{k}" for r in "qkv")
        assert after[f"blk.1.ffn_gate_up_exps#{k}"].device == d
    before = place_graph(merge_up_gate(merge_qkv(build(MOE, tiny_opts()))), MOE, devs, recurrent="split")
    verify_placed(before)
    assert sorted(n.name for n in before.nodes) == sorted(n.name for n in after.nodes)


@pytest.mark.skipif(Session is None, reason="backends.cuda has no Session yet (the executor is being written)")
@pytest.mark.parametrize("cfg", [LLAMA, MOE], ids=["llama", "qwen3_next"])
def test_merged_graphs_compute_the_same_logits(cfg: ModelConfig) -> None:
    ids = [1, 2, 3, 4]
    want = Session(cfg, devices="cpu", ctx=8).prefill(ids)
    got = Session(cfg, devices="cpu", ctx=8, transform=lambda g: merge_up_gate(merge_qkv(g))).prefill(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
