"""Per-op cost rules: coverage of the closed op table and the work each rule reports."""

from __future__ import annotations

import math

import pytest

from backends.costmodel.rules import RULES, distinct_experts, work
from graphir.graph import Graph
from graphir.models import BuildOptions, build
from graphir.models.sources import load_preset
from graphir.ops import DEFS, Op
from graphir.quant import scheme


def test_every_op_has_a_rule() -> None:
    assert set(RULES) == set(Op), f"missing: {set(Op) - set(RULES)}"


def _graph(phase: str, kv: str = "q8_0", layers: int = 4) -> Graph:
    cfg = load_preset("qwen3-next-80b-a3b").with_layers(layers)
    return build(cfg, BuildOptions(phase=phase, quant=scheme("IQ4_XS"), kv_type=kv, logits="last"))


def test_views_and_leaves_launch_nothing() -> None:
    g = _graph("tg")
    env = {"T": 1, "KV": 100}
    for n in g.nodes:
        w = work(n, [g[i] for i in n.inputs], env)
        assert w.launches == DEFS[n.op].launches, n.name


def test_distinct_experts_formula() -> None:
    assert distinct_experts(512, 10, 1) == pytest.approx(10)
    assert distinct_experts(512, 10, 2048) == pytest.approx(512 * (1 - (1 - 10 / 512) ** 2048))
    assert distinct_experts(512, 10, 2048) > 511.9


def test_moe_reads_k_experts_in_tg_and_nearly_all_in_pp() -> None:
    for phase, T, frac in (("tg", 1, 10 / 512), ("pp", 2048, distinct_experts(512, 10, 2048) / 512)):
        g = _graph(phase)
        n = g["blk.0.ffn_up_exps"]
        w = work(n, [g[i] for i in n.inputs], {"T": T, "KV": 0})
        full = g["blk.0.ffn_up_exps.weight"].spec.nbytes_at({})
        assert w.wbytes == pytest.approx(full * frac)
        assert w.flops == pytest.approx(2 * T * 10 * 512 * 2048)
        assert w.m == pytest.approx(T * 10 / (frac * 512))


def test_attention_kv_bytes_and_flops_grow_linearly_with_depth() -> None:
    g = _graph("tg")
    n = g["blk.3.kqv"]
    ins = [g[i] for i in n.inputs]
    w0, w1, w2 = (work(n, ins, {"T": 1, "KV": kv}) for kv in (0, 1000, 2000))
    # q8_0 cache: 34 bytes per 32 values (8.5 bits); K and V, 2 heads of 256
    assert w1.kvbytes - w0.kvbytes == pytest.approx(1000 * 2 * 2 * 256 * 34 / 32)
    assert w2.flops - w1.flops == pytest.approx(w1.flops - w0.flops)
    assert w1.flops - w0.flops == pytest.approx(4 * 16 * 256 * 1000)


def test_causal_pp_attention_flops() -> None:
    g = _graph("pp")
    n = g["blk.3.kqv"]
    w = work(n, [g[i] for i in n.inputs], {"T": 8, "KV": 0})
    # query i sees i+1 keys: sum = 36 = 8 * (8 - 7/2)
    assert w.flops == pytest.approx(4 * 16 * 256 * 36)


def test_weights_at_their_quant_bits() -> None:
    g = _graph("tg")
    n = g["blk.0.ssm_in"]
    w = work(n, [g[i] for i in n.inputs], {"T": 1, "KV": 0})
    assert w.wbytes == pytest.approx(12288 * 2048 * 4.25 / 8)  # IQ4_XS: 4.25 bits per weight
    assert w.wdtype == "iq4_xs"


def test_recurrent_state_is_read_and_written() -> None:
    g = _graph("tg")
    n = g["blk.0.delta_net"]
    w = work(n, [g[i] for i in n.inputs], {"T": 1, "KV": 0})
    state = 128 * 32 * 128 * 4
    assert w.actbytes >= 2 * state
    assert math.isclose(w.flops, 6 * 32 * 128 * 128)
