"""The IR core: symbolic dims, dtypes and llama.cpp file types, the op table through the
builder, verify(), the text and JSON forms, networkx and Graphviz views.

Oracles: gguf.constants.GGML_QUANT_SIZES for block sizes, llama.cpp's published rules for
file types, hand-built graphs with a known defect for verify, and the graph itself for the
round trips (parse(print(g)) == g for every preset and phase).
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from graphir import dims as D
from graphir.builder import Builder
from graphir.dtypes import DTypeError, dtype, fit_to_row, from_ggml
from graphir.graph import Graph, GraphError, Node, verify
from graphir.models import BuildOptions, build, from_hf_dict
from graphir.models.sources import load_preset, preset_names
from graphir.ops import DEFS, Op, ShapeError, infer
from graphir.quant import file_type, scheme, uniform
from graphir.serialize import from_json, to_dot, to_json, to_networkx
from graphir.spec import spec
from graphir.text import ParseError, from_text, to_text

# ---- dims -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, canon", [
    ("KV+T", "KV+T"), ("T+KV", "KV+T"), (" T + KV ", "KV+T"), ("3+T", "T+3"), ("T+3", "T+3"),
    ("T-1", "T-1"), ("-1+T", "T-1"), ("T+T", "2*T"), ("2*T-T", "T"), ("T-T", 0), ("KV+T-KV", "T"),
    ("7", 7), (" 12 ", 12), ("5-2", 3), ("-T", "-T"), (4, 4), ("2*KV+3*T+1", "2*KV+3*T+1"),
])
def test_dim_canonical(raw, canon):
    assert D.dim(raw) == canon
    assert D.dim(D.dim(raw)) == canon  # idempotent


def test_dim_arithmetic():
    assert D.add("KV", "T") == "KV+T"
    assert D.add("T", 3) == "T+3"
    assert D.add(3, 4) == 7
    assert D.sub("T+3", 4) == "T-1"
    assert D.sub("KV+T", "KV") == "T"
    assert D.sub("T", "T") == 0
    assert D.scale("T+1", 2) == "2*T+2"
    assert D.scale("T", 0) == 0
    assert D.mul_dims(("T", 4, 8)) == "32*T"
    assert D.mul_dims((2, 3)) == 6
    assert D.symbols("KV+T") == ("KV", "T") and D.symbols(5) == ()
    assert D.is_static(5) and not D.is_static("T")


def test_dim_bind():
    assert D.bind("KV+T", {"KV": 5, "T": 3}) == 8
    assert D.bind("T-1", {"T": 1}) == 0
    assert D.bind(9, {}) == 9
    with pytest.raises(D.DimError, match="needs a value for T"):
        D.bind("KV+T", {"KV": 1})


@pytest.mark.parametrize("bad", ["X+1", "T+Q", "", "T+", "2T", "T2", "3*4", "T*T+", "T+-3", True, 1.5, None])
def test_dim_errors(bad):
    with pytest.raises(D.DimError):
        D.dim(bad)


def test_dim_unknown_symbol_named():
    with pytest.raises(D.DimError, match="unknown symbol 'N'"):
        D.dim("N+1")
    with pytest.raises(D.DimError, match="not linear"):
        D.mul_dims(("T", "KV"))


_lin = st.tuples(st.integers(-5, 5), st.integers(-5, 5), st.integers(-300, 300))


def _expr(kv: int, t: int, c: int) -> str:
    # a deliberately non-canonical spelling: constant first, explicit coefficients
    return f"{c}+{kv}*KV+{t}*T".replace("+-", "-")


@settings(deadline=None, max_examples=60)
@given(a=_lin, b=_lin, env=st.tuples(st.integers(0, 10_000), st.integers(1, 4096)), k=st.integers(-3, 3))
def test_dim_algebra_matches_integers(a, b, env, k):
    e = {"KV": env[0], "T": env[1]}
    va = a[0] * e["KV"] + a[1] * e["T"] + a[2]
    vb = b[0] * e["KV"] + b[1] * e["T"] + b[2]
    da, db = D.dim(_expr(*a)), D.dim(_expr(*b))
    assert D.bind(da, e) == va
    assert D.bind(D.add(da, db), e) == va + vb
    assert D.bind(D.sub(da, db), e) == va - vb
    assert D.bind(D.scale(da, k), e) == k * va
    assert D.add(da, db) == D.add(db, da)  # one canonical spelling
    assert D.dim(str(da)) == da
    assert isinstance(da, int) == (a[0] == 0 and a[1] == 0)


# ---- dtypes -----------------------------------------------------------------------------

REQUIRED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
            "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ4_NL", "IQ4_XS", "MXFP4"]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_dtypes_match_ggml(name):
    dt = dtype(name)
    assert dt is dtype(name.lower())
    gt = GGMLQuantizationType[name]
    assert (dt.block_size, dt.type_size) == GGML_QUANT_SIZES[gt]
    assert dt.ggml == int(gt) and from_ggml(int(gt)) is dt
    assert dt.is_quant == (name not in ("F32", "F16", "BF16"))
    assert dt.is_float == (name in ("F32", "F16", "BF16"))


def test_every_ggml_type_round_trips():
    for gt, (block, size) in GGML_QUANT_SIZES.items():
        dt = from_ggml(int(gt))
        assert (dt.name, dt.block_size, dt.type_size) == (gt.name.lower(), block, size)


@pytest.mark.parametrize("name, bpw", [
    ("q4_k", 4.5), ("iq4_xs", 4.25), ("q8_0", 8.5), ("q6_k", 6.5625), ("q4_0", 4.5), ("q5_k", 5.5),
    ("q2_k", 2.625), ("q3_k", 3.4375), ("iq2_xxs", 2.0625), ("iq2_xs", 2.3125), ("iq3_xxs", 3.0625),
    ("iq4_nl", 4.5), ("mxfp4", 4.25), ("f16", 16.0), ("bf16", 16.0), ("f32", 32.0),
])
def test_bits_per_weight(name, bpw):
    assert dtype(name).bits_per_weight == bpw


def test_dtype_errors_and_nbytes():
    with pytest.raises(DTypeError, match="unknown type 'q9_z'"):
        dtype("q9_z")
    with pytest.raises(DTypeError):
        from_ggml(9999)
    assert dtype("q4_k").nbytes(4096) == 16 * 144
    assert dtype("bf16").nbytes(10) == 20
    assert spec("q8_0", 3, 64).nbytes_at({}) == 3 * 2 * 34
    assert spec("f16", "KV", 2, 256).nbytes_at({"KV": 10}) == 10 * 2 * 256 * 2


def test_fit_to_row_follows_llama_cpp_fallbacks():
    assert fit_to_row(dtype("q4_k"), 2048) is dtype("q4_k")
    assert fit_to_row(dtype("q4_k"), 96) is dtype("q5_0")
    assert fit_to_row(dtype("q5_k"), 96) is dtype("q5_1")
    assert fit_to_row(dtype("q6_k"), 96) is dtype("q8_0")
    assert fit_to_row(dtype("iq4_xs"), 96) is dtype("iq4_nl")
    assert fit_to_row(dtype("q2_k"), 96) is dtype("iq4_nl")
    assert fit_to_row(dtype("q4_k"), 100) is dtype("f16")  # not even a multiple of 32
    assert fit_to_row(dtype("q8_0"), 100) is dtype("f16")


# ---- llama.cpp file types ---------------------------------------------------------------


def _more_bits(i: int, n: int) -> bool:
    # llama.cpp llama_tensor_get_type's use_more_bits(), C integer semantics
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def test_q4_k_m_on_a_built_graph():
    cfg = load_preset("qwen3-8b")
    g = build(cfg, BuildOptions(phase="tg", quant=scheme("Q4_K_M")))
    w = {n.name: n.spec.dtype.name for n in g.nodes if n.op == Op.WEIGHT}
    n = cfg.n_layer
    assert w["output.weight"] == "q6_k"
    assert w["token_embd.weight"] == "q4_k"
    assert w["output_norm.weight"] == "f32"
    v_types = [w[f"blk.{i}.attn_v.weight"] for i in range(n)]
    d_types = [w[f"blk.{i}.ffn_down.weight"] for i in range(n)]
    assert v_types == ["q6_k" if _more_bits(i, n) else "q4_k" for i in range(n)]
    assert d_types == v_types
    assert v_types[0] == v_types[-1] == "q6_k" and "q4_k" in v_types  # some, not all
    for i in range(n):
        assert w[f"blk.{i}.attn_q.weight"] == "q4_k"
        assert w[f"blk.{i}.attn_norm.weight"] == w[f"blk.{i}.attn_q_norm.weight"] == "f32"
    assert g.info["quant"] == "Q4_K_M"


def test_file_type_row_fallback_and_recurrent_params():
    # intermediate 1344 is a multiple of 32, not of 256: ffn_down rows fall back like llama.cpp
    d = dict(model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=1344, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8)
    g = build(from_hf_dict(d), BuildOptions(phase="tg", quant=scheme("Q4_K_M")))
    w = {n.name: n.spec.dtype.name for n in g.nodes if n.op == Op.WEIGHT}
    assert w["blk.0.ffn_down.weight"] == "q8_0"  # bumped to q6_k, which falls back to q8_0
    assert w["blk.1.ffn_down.weight"] == "q5_0"  # q4_k falls back to q5_0
    assert w["blk.1.ffn_up.weight"] == "q4_k"  # rows of 512 are fine
    qn = build(load_preset("qwen3-next-80b-a3b").with_layers(4), BuildOptions(phase="tg", quant=scheme("IQ4_XS")))
    w = {n.name: n.spec.dtype.name for n in qn.nodes if n.op == Op.WEIGHT}
    for name in ("blk.0.ssm_a", "blk.0.ssm_dt.bias", "blk.0.ssm_conv1d.weight", "blk.0.ssm_norm.weight",
                 "blk.0.ffn_gate_inp.weight", "blk.0.attn_norm.weight"):
        assert w[name] == "f32", name
    assert w["blk.0.ffn_gate_exps.weight"] == "iq4_xs"
    assert w["output.weight"] == "q6_k"


def test_scheme_parsing():
    assert scheme(None).label == "bf16"
    assert scheme("q8_0").label == "Q8_0"  # also a llama.cpp file type
    assert scheme("q4_k").label == "q4_k"  # a plain ggml type: uniform
    assert scheme("IQ4_XS").label == "IQ4_XS"
    assert scheme("mostly_q4_k_m").label == "Q4_K_M"
    assert scheme("BF16")("blk.0.attn_q.weight", (64, 64), 1).name == "bf16"
    assert uniform("q8_0")("blk.0.attn_norm.weight", (64,), 1).name == "f32"
    with pytest.raises(DTypeError):
        scheme("Q9_X")
    with pytest.raises(ValueError):
        file_type("Q7_K_XL")


# ---- op table through the builder --------------------------------------------------------


def _b() -> Builder:
    b = Builder()
    b.leaf(Op.INPUT, "x", spec("f32", "T", 64), role="h")
    return b


def test_builder_infers_specs():
    b = _b()
    b.leaf(Op.WEIGHT, "w", spec("q4_k", 256, 64))
    assert b.spec(b.emit(Op.MATMUL, "y", "x", "w")) == spec("f32", "T", 256)
    assert b.spec(b.emit(Op.RESHAPE, "yh", "y", shape=("T", 4, 64))) == spec("f32", "T", 4, 64)
    b.leaf(Op.STATE_IN, "cache", spec("f16", "KV", 4, 64), state="cache")
    assert b.spec(b.emit(Op.KV_APPEND, "kv", "cache", "yh")) == spec("f16", "KV+T", 4, 64)
    assert b.spec(b.emit(Op.SLICE, "last", "y", dim=0, start="T-1", stop="T")) == spec("f32", 1, 256)


@pytest.mark.parametrize("case, match", [
    ("matmul", r"%bad \(matmul\): matmul inner dims differ"),
    ("attention", r"%bad \(attention\): .*multiple of kv heads"),
    ("reshape", r"%bad \(reshape\): .*changes the size"),
    ("unknown_input", r"%bad \(silu\): unknown input\(s\) %nope"),
    ("missing_attr", r"%bad \(rms_norm\): rms_norm needs attribute\(s\) eps"),
    ("unknown_attr", r"%bad \(silu\): silu has unknown attribute\(s\) colour"),
    ("arity", r"%bad \(add\): add takes 2 inputs, got 1"),
])
def test_shape_errors_name_the_node(case, match):
    b = _b()
    b.leaf(Op.WEIGHT, "w", spec("bf16", 128, 32))
    b.leaf(Op.WEIGHT, "n", spec("f32", 64))
    b.leaf(Op.INPUT, "q", spec("f32", "T", 6, 64), role="q")
    b.leaf(Op.INPUT, "k", spec("f32", "T", 4, 64), role="k")
    emit = {
        "matmul": lambda: b.emit(Op.MATMUL, "bad", "x", "w"),
        "attention": lambda: b.emit(Op.ATTENTION, "bad", "q", "k", "k", scale=0.125),
        "reshape": lambda: b.emit(Op.RESHAPE, "bad", "x", shape=("T", 32)),
        "unknown_input": lambda: b.emit(Op.SILU, "bad", "nope"),
        "missing_attr": lambda: b.emit(Op.RMS_NORM, "bad", "x", "n"),
        "unknown_attr": lambda: b.emit(Op.SILU, "bad", "x", colour="red"),
        "arity": lambda: b.emit(Op.ADD, "bad", "x"),
    }[case]
    with pytest.raises(GraphError, match=match):
        emit()
    assert "bad" not in b


def test_builder_rejects_duplicates_and_non_leaves():
    b = _b()
    with pytest.raises(GraphError, match="duplicate node name %x"):
        b.leaf(Op.INPUT, "x", spec("f32", 1), role="h")
    with pytest.raises(GraphError, match="not a leaf"):
        b.leaf(Op.MATMUL, "m", spec("f32", 1))


def test_infer_refuses_leaves():
    with pytest.raises(ShapeError):
        infer(Op.WEIGHT, [], {})


# ---- verify -----------------------------------------------------------------------------

X = Node("x", Op.INPUT, (), spec("f32", "T", 8), (("role", "h"),))
W = Node("w", Op.WEIGHT, (), spec("bf16", 4, 8))
Y = Node("y", Op.MATMUL, ("x", "w"), spec("f32", "T", 4))


def test_verify_accepts_a_good_graph():
    verify(Graph((X, W, Y)))


@pytest.mark.parametrize("nodes, match", [
    ((Y, X, W), r"%y: input %x is not defined before it"),
    ((X, W, Y.with_(spec=spec("f32", "T", 5))), r"%y \(matmul\): spec f32\[T,5\] but its inputs give f32\[T,4\]"),
    ((X, W, Y.with_(spec=spec("bf16", "T", 4))), r"%y \(matmul\): spec bf16"),
    ((X, X, W), r"%x: duplicate node name"),
    ((X, W, Y.with_(name="bad name")), r"bad node name"),
    ((X, W.with_(inputs=("x",))), r"%w \(weight\): weight takes no inputs"),
    ((X, W, Y.with_(attrs=(("k", 1),))), r"%y \(matmul\): matmul has unknown attribute"),
])
def test_verify_catches(nodes, match):
    with pytest.raises(GraphError, match=match):
        verify(Graph(nodes))


def _placed(*nodes: Node) -> Graph:
    return Graph(nodes)


def test_verify_cross_device_reads():
    x0 = X.with_(device="cuda:0")
    w1 = W.with_(device="cuda:1")
    # reading x (on cuda:0) from cuda:1 without a copy
    with pytest.raises(GraphError, match=r"%y on cuda:1 reads %x which lives on cuda:0"):
        verify(_placed(x0, w1, Y.with_(device="cuda:1")))
    # an explicit copy makes it legal
    cp = Node("x#1", Op.COPY, ("x",), X.spec, device="cuda:1")
    verify(_placed(x0, w1, cp, Y.with_(inputs=("x#1", "w"), device="cuda:1")))
    # a node without a device in a placed graph
    with pytest.raises(GraphError, match="no device in a placed graph"):
        verify(_placed(x0, W, Y.with_(device="cuda:0")))
    # only collectives span devices
    with pytest.raises(GraphError, match="only collectives may span devices"):
        verify(_placed(x0, W.with_(device="cuda:0"), Y.with_(device="cuda:0,cuda:1")))


def test_verify_all_reduce():
    x0, x1 = X.with_(device="cuda:0"), X.with_(name="x1", device="cuda:1")
    w0, w1 = W.with_(device="cuda:0"), W.with_(name="w1", device="cuda:1")
    y0 = Y.with_(device="cuda:0")
    y1 = Y.with_(name="y1", inputs=("x1", "w1"), device="cuda:1")
    ar = Node("sum", Op.ALL_REDUCE, ("y", "y1"), Y.spec, device="cuda:0,cuda:1")
    verify(_placed(x0, x1, w0, w1, y0, y1, ar))
    after = Node("after", Op.SILU, ("sum",), Y.spec, device="cuda:1")  # the result lives on the whole group
    verify(_placed(x0, x1, w0, w1, y0, y1, ar, after))
    with pytest.raises(GraphError, match="outside the group"):
        verify(_placed(x0, x1, w0, w1, y0, y1, ar.with_(device="cuda:0,cuda:2")))
    with pytest.raises(GraphError, match="one partial per device"):
        verify(_placed(x0, x1, w0, w1, y0, y1, ar.with_(inputs=("y", "y"))))


# ---- text and JSON forms ----------------------------------------------------------------

PRESETS = preset_names()


def test_presets_listed():
    assert {"qwen3-next-80b-a3b", "qwen3-0.6b", "llama-3-8b", "qwen3-30b-a3b"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_round_trips_every_preset(name):
    cfg = load_preset(name)
    for phase in ("pp", "tg"):
        for opts in (BuildOptions(phase=phase),
                     BuildOptions(phase=phase, quant=scheme("IQ4_XS"), kv_type="q8_0", logits="last")):
            g = build(cfg, opts)
            verify(g)
            text = to_text(g)
            back = from_text(text)
            assert back == g
            assert to_text(back) == text  # the printed form is canonical
            assert from_json(to_json(g)) == g
            assert from_json(to_json(g, indent=1)) == g


def test_float_attrs_survive():
    g = build(load_preset("qwen3-next-80b-a3b").with_layers(4), BuildOptions(phase="tg"))
    text = to_text(g)
    assert "eps=1e-06" in text and "theta=10000000.0" in text and "offset=1.0" in text
    back = from_text(text)
    for h in (back, from_json(to_json(g))):
        rope = h["blk.3.q_rope"].attr
        assert type(rope["theta"]) is float and rope["theta"] == 10000000.0
        assert type(rope["n_rot"]) is int and rope["n_rot"] == 64
        eps = h["blk.0.attn_norm"].attr["eps"]
        assert type(eps) is float and eps == 1e-06


_key = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
_scalar = st.one_of(
    st.integers(-2**40, 2**40), st.booleans(), st.text(max_size=12),
    st.floats(allow_nan=False), st.sampled_from([1e-06, 1e-5, 10000000.0, 1e16, -0.5, 2.0, 5e-324]),
)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)


@settings(deadline=None, max_examples=80)
@given(attrs=st.dictionaries(_key, _value, max_size=5), meta=st.dictionaries(_key, _value, max_size=3))
def test_attribute_values_round_trip(attrs, meta):
    n = Node("blk.0.w", Op.WEIGHT, (), spec("q4_k", 256, "T+3"), tuple(attrs.items()), "cuda:0")
    g = Graph((n,), tuple(meta.items()))
    back = from_text(to_text(g))
    assert back == g
    for k, v in n.attrs:  # and types: 1 stays int, 1.0 stays float, True stays bool
        assert repr(back.nodes[0].attr[k]) == repr(v)
    assert from_json(to_json(g)) == g


def test_nan_and_inf_attrs():
    n = Node("w", Op.WEIGHT, (), spec("f32", 2), (("a", math.inf), ("b", -math.inf), ("c", math.nan)))
    back = from_text(to_text(Graph((n,)))).nodes[0].attr
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"])


GOOD = """graph {arch="llama"}
%x : f32[T,8] = input() {role="h"}
%w : bf16[4,8] = weight()
%y : f32[T,4] = matmul(%x, %w)
"""


@pytest.mark.parametrize("text, line", [
    ("", 1),
    ("nodes\n%x : f32[T,8] = input()\n", 1),
    ("graph {arch=\n", 1),
    ("graph {\n", 1),
    (GOOD.replace("matmul", "matmool"), 4),
    (GOOD.replace("f32[T,4]", "f99[T,4]"), 4),
    (GOOD.replace("bf16[4,8]", "bf16[4,Q]"), 3),
    (GOOD.replace("{role=\"h\"}", "{role=}"), 2),
    (GOOD.replace("{role=\"h\"}", "{role=[1,}"), 2),
    (GOOD.replace("(%x, %w)", "(x, %w)"), 4),
    (GOOD.replace("= weight()", "weight()"), 3),
    # blank and comment lines still count: the error is on the file's line 6
    (GOOD.replace("%y", "\n# a comment\n%y").replace("matmul", "matmool"), 6),
])
def test_parse_errors_carry_line_numbers(text, line):
    with pytest.raises(ParseError, match=rf"^line {line}: "):
        from_text(text)


def test_parse_good_text():
    g = from_text(GOOD)
    verify(g)
    assert [n.name for n in g] == ["x", "w", "y"] and g.info == {"arch": "llama"}
    assert to_text(g) == GOOD


def test_from_json_rejects_other_documents():
    with pytest.raises(ValueError):
        from_json('{"nodes": []}')


# ---- networkx and dot -------------------------------------------------------------------


def test_to_networkx():
    g = build(load_preset("qwen3-next-80b-a3b"), BuildOptions(phase="pp"), layers=range(0, 4))
    G = to_networkx(g)
    assert G.number_of_nodes() == len(g)
    assert G.number_of_edges() == sum(len(n.inputs) for n in g.nodes)
    assert G.nodes["blk.3.kqv"]["op"] == "attention" and G.nodes["blk.3.kqv"]["layer"] == 3
    import networkx as nx

    assert nx.is_directed_acyclic_graph(G)
    order = {n.name: i for i, n in enumerate(g.nodes)}
    assert all(order[u] < order[v] for u, v in G.edges())


def test_every_op_has_a_def():
    assert set(DEFS) == set(Op)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not on PATH")
@pytest.mark.parametrize("weights", [False, True])
def test_to_dot_renders(weights):
    g = build(load_preset("qwen3-next-80b-a3b"), BuildOptions(phase="tg"), layers=range(2, 4))
    src = to_dot(g, weights=weights)
    r = subprocess.run(["dot", "-Tsvg"], input=src, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "<svg" in r.stdout
    assert ("blk.3.attn_q.weight" in src) == weights
    n_shown = sum(1 for n in g.nodes if weights or n.op != Op.WEIGHT)
    assert r.stdout.count('class="node"') == n_shown
