"""ik_llama.cpp's quant types, KV types and per-tensor types from a GGUF header.

The oracle for sizes is ik_llama.cpp's source, written out here as facts: type ids (ggml.h),
block sizes and bytes per block (ggml-common.h's block structs), per-row meta bytes (ggml.c's
type traits), and the bits per weight its documentation quotes. GGUF files are written with
gguf.GGUFWriter's raw tensor API (the type id and shape given, the bytes sized from the facts
below), so the reader is checked against an independent writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from cli.main import main
from graphir.dtypes import DTYPES, FAMILIES, KV_TYPES, DTypeError, dtype, fit_to_row, from_ggml, kv_dtype
from graphir.models import BuildOptions, ConfigError, build
from graphir.models.gguf_header import GGUFError, read_header
from graphir.models.sources import load_source
from graphir.ops import Op
from graphir.quant import file_type, scheme
from graphir.spec import spec

# name: (ggml id, block size, bytes per block, row meta bytes, family)
IK_FACTS = {
    "q6_0": (133, 32, 26, 0, "legacy"), "iq1_bn": (134, 64, 13, 2, "bitnet"), "iq2_bn": (135, 64, 16, 4, "bitnet"),
    "iq2_k": (137, 256, 76, 0, "ik"), "iq3_k": (138, 256, 110, 0, "ik"), "iq4_k": (139, 256, 144, 0, "ik"),
    "iq5_k": (140, 256, 176, 0, "ik"), "iq6_k": (141, 256, 212, 0, "ik"), "iq4_ks": (144, 256, 136, 4, "ik"),
    "iq2_ks": (145, 256, 70, 2, "ik"), "iq4_kss": (146, 256, 128, 4, "ik"), "iq5_ks": (152, 256, 168, 4, "ik"),
    "iq2_kt": (153, 256, 68, 4, "trellis"), "iq3_kt": (154, 256, 100, 4, "trellis"),
    "iq4_kt": (155, 256, 128, 4, "trellis"), "iq3_ks": (156, 256, 102, 2, "ik"), "iq2_kl": (157, 256, 86, 2, "ik"),
    "iq1_kt": (158, 256, 56, 4, "trellis"), "q8_kv": (151, 32, 32, 8, "legacy"),
    "q4_k_r4": (212, 256, 144, 0, "k"), "iq4_ks_r4": (344, 256, 136, 4, "ik"), "iq1_s_r4": (219, 32, 6, 2, "iq"),
    "q8_k_r8": (399, 256, 258, 0, "k"), "iq4_xs_r8": (223, 256, 136, 0, "iq"), "q6_0_r4": (233, 32, 26, 0, "legacy"),
    "bf16_r16": (230, 1, 2, 0, "float"), "mxfp4_r8": (353, 32, 17, 0, "mx"), "iq2_bn_r4": (335, 64, 16, 4, "bitnet"),
}
# the bits per weight ik_llama.cpp quotes (block data only, without the row meta data)
PUBLISHED_BPW = {
    "iq4_ks": 4.25, "iq4_kss": 4.0, "iq2_kl": 2.6875, "iq1_kt": 1.75, "iq2_kt": 2.125, "iq3_kt": 3.125,
    "iq4_kt": 4.0, "iq3_k": 3.4375, "iq4_k": 4.5, "iq5_k": 5.5, "iq6_k": 6.625, "iq2_k": 2.375, "q6_0": 6.5,
    "iq2_ks": 2.1875, "iq3_ks": 3.1875, "iq5_ks": 5.25, "iq1_bn": 1.625, "iq2_bn": 2.0,
}


@pytest.mark.parametrize("name", list(IK_FACTS))
def test_ik_types_match_the_source(name):
    gid, block, size, meta, family = IK_FACTS[name]
    dt = dtype(name)
    assert (dt.ggml, dt.block_size, dt.type_size, dt.row_meta_bytes, dt.family) == (gid, block, size, meta, family)
    assert from_ggml(gid) is dt and dt is dtype(name.upper())
    assert dt.is_quant == (block != 1)
    assert dt.row_bytes(4096) == meta + 4096 // block * size
    assert dt.nbytes(3 * 4096, 4096) == 3 * dt.row_bytes(4096)


@pytest.mark.parametrize("name, bpw", list(PUBLISHED_BPW.items()))
def test_bits_per_weight_as_published_plus_row_meta(name, bpw):
    dt = dtype(name)
    assert 8 * dt.type_size / dt.block_size == bpw
    assert dt.bits_per_weight == pytest.approx(bpw + 8 * dt.row_meta_bytes / 4096, abs=1e-12)
    assert dt.bits_per_weight_at(256 * 1024) < dt.bits_per_weight_at(256) or dt.row_meta_bytes == 0


def test_every_type_has_a_family_and_ids_are_unique():
    ids = [dt.ggml for dt in DTYPES.values() if dt.ggml is not None]
    assert len(ids) == len(set(ids))
    assert all(dt.family in FAMILIES for dt in DTYPES.values())
    # the ids ik shares with mainline keep the gguf package's sizes
    for gt, (block, size) in GGML_QUANT_SIZES.items():
        assert (from_ggml(int(gt)).block_size, from_ggml(int(gt)).type_size) == (block, size)
    fam = {n: dtype(n).family for n in ("q4_0", "iq4_nl", "q6_0", "q4_k", "q8_k", "iq4_xs", "iq1_m", "iq4_ks",
                                        "iq2_kl", "iq3_kt", "iq1_bn", "tq2_0", "mxfp4", "f16", "i32")}
    assert fam == {"q4_0": "legacy", "iq4_nl": "legacy", "q6_0": "legacy", "q4_k": "k", "q8_k": "k",
                   "iq4_xs": "iq", "iq1_m": "iq", "iq4_ks": "ik", "iq2_kl": "ik", "iq3_kt": "trellis",
                   "iq1_bn": "bitnet", "tq2_0": "bitnet", "mxfp4": "mx", "f16": "float", "i32": "int"}


def test_repacked_types_keep_their_base_rows():
    for dt in DTYPES.values():
        if not dt.repacked:
            continue
        base = dtype(dt.base)
        assert dt.family == base.family, dt.name
        if dt.name not in ("iq1_s_r4", "iq1_m_r4", "q8_k_r8", "q8_k_r16", "q8_kv_r8"):  # own layout in ik
            assert dt.row_bytes(4096) == base.row_bytes(4096), dt.name
    assert not dtype("iq4_ks").repacked and dtype("iq4_ks_r4").base == "iq4_ks"
    assert dtype("q1_0_g128") is dtype("q1_0")  # ik's name for mainline's id 41


def test_fit_to_row_follows_ik_fallbacks():
    for name, alt in [("iq4_ks", "iq4_nl"), ("iq2_kt", "iq4_nl"), ("iq3_k", "iq4_nl"), ("iq4_k", "q5_0"),
                      ("iq5_ks", "q5_0"), ("iq5_k", "q6_0"), ("iq6_k", "q8_0"), ("q4_k_r4", "q5_0")]:
        assert fit_to_row(dtype(name), 96) is dtype(alt), name
        assert fit_to_row(dtype(name), 512) is dtype(name)
    assert fit_to_row(dtype("iq1_bn"), 96) is dtype("f16")  # ik has no fallback for its ternary types
    assert fit_to_row(dtype("q6_0"), 96) is dtype("q6_0")


# ---- KV cache types ------------------------------------------------------------------------

def test_kv_types_are_iks_list():
    assert [kv_dtype(k).name for k in KV_TYPES] == list(KV_TYPES)
    assert kv_dtype("Q6_0") is dtype("q6_0")
    for bad in ("q4_k", "iq4_ks", "q9_0"):
        with pytest.raises(DTypeError, match=f"unknown KV cache type '{bad}'"):
            kv_dtype(bad)
    with pytest.raises(DTypeError, match="KV cache type"):
        BuildOptions(kv_type="q4_k")


@pytest.mark.parametrize("kv, bits", [("q6_0", 6.5), ("q8_0", 8.5), ("q4_0", 4.5)])
def test_kv_cache_bytes(kv, bits):
    from graphir.models.sources import load_preset

    cfg = load_preset("qwen3-8b").with_layers(2)
    g = build(cfg, BuildOptions(phase="tg", kv_type=kv))
    caches = [n for n in g.nodes if n.op == Op.STATE_IN and n.name.endswith("cache_k")]
    assert caches and all(n.spec.dtype is dtype(kv) for n in caches)
    n = caches[0]
    per_token = n.spec.nbytes_at({"KV": 1})
    assert per_token * 8 == bits * cfg.n_kv_head * cfg.head_dim
    # q8_kv: one 8-byte row header per head row (a row is one head's head_dim values)
    assert spec("q8_kv", "KV", 8, 128).nbytes_at({"KV": 10}) == 10 * 8 * (8 + 128)


# ---- ik file types -------------------------------------------------------------------------

def _t(q, name, shape, n_layer=16):
    return q(name, shape, n_layer).name


def test_ik_file_types_output_embedding_and_bumps():
    H, V = 4096, 151936
    q = file_type("IQ4_KS")
    assert _t(q, "output.weight", (V, H)) == "q6_k"
    assert _t(q, "token_embd.weight", (V, H)) == "iq4_ks"
    assert _t(q, "blk.3.ffn_down.weight", (H, 12288)) == "iq4_ks"
    assert _t(q, "blk.3.attn_v.weight", (1024, H)) == "iq5_k"  # GQA 4
    assert _t(q, "blk.3.attn_v.weight", (4096, H)) == "iq4_ks"  # no GQA: stays
    assert _t(q, "blk.3.attn_norm.weight", (H,)) == "f32"
    assert _t(q, "blk.3.ffn_gate_inp.weight", (128, H)) == "f32"
    assert _t(q, "blk.3.ffn_up.weight", (96, 96)) == "iq4_nl"  # rows of 96: ik's fallback
    assert _t(q, "output.weight", (V, 2880)) == "q8_0"  # output rows not whole super-blocks
    for ft, out in [("IQ2_K", "q5_k"), ("IQ3_K", "q5_k"), ("IQ2_KL", "q5_k"), ("IQ1_KT", "q5_k"),
                    ("IQ2_KT", "q5_k"), ("IQ3_KT", "q5_k"), ("IQ4_KT", "q6_k"), ("IQ4_KSS", "q6_k"),
                    ("IQ5_K", "q6_k"), ("IQ5_KS", "q6_k"), ("IQ6_K", "iq6_k"), ("Q6_0", "q6_k")]:
        assert _t(scheme(ft), "output.weight", (V, H)) == out, ft
    q = file_type("IQ2_KT")
    assert [_t(q, "blk.5.attn_v.weight", (r, H)) for r in (1024, 2048, 4096)] == ["iq4_k", "iq3_k", "q2_k"]
    assert _t(q, "blk.0.ffn_down.weight", (H, 12288)) == "iq3_k"
    assert _t(q, "blk.8.ffn_down.weight", (H, 12288)) == "iq2_kt"
    assert _t(file_type("IQ3_KT"), "token_embd.weight", (V, H)) == "iq3_s"
    assert _t(file_type("IQ1_BN"), "token_embd.weight", (V, H)) == "iq4_nl"
    # a repacked uniform type: token embeddings cannot be row-interleaved
    q = scheme("iq4_ks_r4")
    assert (_t(q, "token_embd.weight", (V, H)), _t(q, "blk.0.attn_q.weight", (H, H))) == ("iq4_ks", "iq4_ks_r4")


def test_ik_file_type_model_bits():
    from graphir.models.sources import load_preset
    from graphir.stats import graph_stats

    cfg = load_preset("qwen3-8b")
    bits = {}
    for ft in ("IQ2_KT", "IQ3_K", "IQ4_KS", "IQ5_K", "IQ6_K"):
        s = graph_stats(build(cfg, BuildOptions(phase="tg", quant=scheme(ft))))
        bits[ft] = 8 * s.weight_bytes / s.params_total
    assert list(bits) == sorted(bits, key=bits.__getitem__)  # more bits per the name
    for ft, b in bits.items():  # above the base type, below base + the q6_k output's share
        base = dtype(ft.lower()).bits_per_weight
        assert base < b < base + 1.0, (ft, b)


# ---- GGUF headers with ik types ----------------------------------------------------------

H, F, V, L, HQ, HKV, HD = 256, 512, 512, 2, 4, 2, 64
CONFIG = dict(model_type="llama", vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L,
              num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=HD, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
# tensor -> (shape in torch order, type name); every type here is unknown to the gguf package
TABLE = {"token_embd.weight": ((V, H), "iq4_ks"), "output_norm.weight": ((H,), "f32"),
         "output.weight": ((V, H), "q6_k")}
for _i in range(L):
    _p = f"blk.{_i}."
    TABLE.update({
        _p + "attn_norm.weight": ((H,), "f32"), _p + "ffn_norm.weight": ((H,), "f32"),
        _p + "attn_q.weight": ((HQ * HD, H), "iq1_kt"), _p + "attn_k.weight": ((HKV * HD, H), "iq2_kl"),
        _p + "attn_v.weight": ((HKV * HD, H), "q6_0"), _p + "attn_output.weight": ((H, HQ * HD), "iq4_kss"),
        _p + "ffn_gate.weight": ((F, H), "iq4_ks_r4"), _p + "ffn_up.weight": ((F, H), "iq2_bn"),
        _p + "ffn_down.weight": ((H, F), "iq3_kt"),
    })
_PLAIN = {"f32": (0, 1, 4, 0), "q6_k": (14, 256, 210, 0)}


def _facts(name: str) -> tuple[int, int, int, int]:
    return _PLAIN[name] if name in _PLAIN else IK_FACTS[name][:4]


def _file_bytes(shape: tuple[int, ...], type_name: str) -> int:
    _, block, size, meta = _facts(type_name)
    return math.prod(shape[:-1]) * (meta + shape[-1] // block * size)


def write_ik_gguf(path: Path) -> int:
    """A llama GGUF whose tensors carry ik type ids; returns the bytes of tensor data written."""
    w = GGUFWriter(str(path), "llama")
    for k, v in {"block_count": L, "context_length": 4096, "embedding_length": H, "feed_forward_length": F,
                 "attention.head_count": HQ, "attention.head_count_kv": HKV, "attention.key_length": HD,
                 "attention.value_length": HD, "rope.dimension_count": HD, "vocab_size": V}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    # every metadata value type, arrays of arrays and a long (skipped) array included
    w.add_int8("test.i8", -3)
    w.add_uint64("test.u64", 2 ** 40)
    w.add_float64("test.f64", 0.25)
    w.add_bool("test.bool", True)
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(5000)])
    total = 0
    for name, (shape, tname) in TABLE.items():
        n = _file_bytes(shape, tname)
        # int8 bytes with raw_dtype: the writer keeps the given shape and writes the id as is
        w.add_tensor(name, np.zeros(n, np.int8), raw_shape=shape, raw_dtype=_facts(tname)[0])  # type: ignore[arg-type]
        total += n
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return total


@pytest.fixture(scope="module")
def ik_file(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("ikgguf") / "ik-mix.gguf"
    return path, write_ik_gguf(path)


def test_header_reader_reads_ik_types(ik_file):
    path, total = ik_file
    h = read_header(path)
    assert h.version == 3
    assert {t.name: (t.shape, t.dtype.name) for t in h.tensors} == TABLE
    assert h.tensor_bytes == total
    assert all(t.nbytes == _file_bytes(t.shape, t.dtype.name) for t in h.tensors)
    m = h.metadata
    assert (m["test.i8"], m["test.u64"], m["test.f64"], m["test.bool"], m["test.nested"]) == \
        (-3, 2 ** 40, 0.25, True, [[1, 2], [3]])
    assert len(m["tokenizer.ggml.tokens"]) == 5000
    assert h.data_start % 32 == 0 and h.data_start + total <= h.file_size


def test_model_gguf_weights_in_its_own_types(ik_file):
    path, total = ik_file
    src = load_source(path)
    assert dict(src.tensor_types) == {k: dtype(t) for k, (_, t) in TABLE.items()}
    g = build(src.cfg, BuildOptions(phase="tg", quant=_own(src)))
    w = {n.name: n.spec for n in g.nodes if n.op == Op.WEIGHT}
    assert {k: s.dtype.name for k, s in w.items()} == {k: t for k, (_, t) in TABLE.items()}
    assert sum(s.nbytes_at({}) for s in w.values()) == total


def _own(src):
    from graphir.models.sources import weight_scheme

    return weight_scheme(src, None)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def config_json(tmp_path) -> Path:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(CONFIG))
    return p


def test_quant_file_in_stats_and_predict(ik_file, config_json, capsys):
    path, total = ik_file
    code, out, err = _run(capsys, "stats", str(config_json), "--quant", str(path))
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "weight bytes" in ln)
    assert int(line.split()[2].replace(",", "")) == total
    assert f"weights gguf:{path.name}" in out
    ctx = 1024
    code, out, err = _run(capsys, "predict", str(config_json), "--quant", str(path), "--kv-type", "q6_0",
                          "--ctx", str(ctx), "--ubatch", "512", "--split", "layer", "--format", "json")
    assert code == 0, err
    mem = sum(json.loads(out)["modes"]["layer"]["memory_GiB"]) * 2**30
    kv = 2 * L * ctx * HKV * HD * 6.5 / 8  # K and V caches in q6_0
    assert mem - kv == pytest.approx(total, rel=0.01)
    code, out, err = _run(capsys, "predict", str(path), "--ctx", str(ctx), "--ubatch", "512", "--split", "layer",
                          "--kv-type", "q6_0", "--format", "json")  # the model is the GGUF: its own types
    assert code == 0, err
    assert sum(json.loads(out)["modes"]["layer"]["memory_GiB"]) * 2**30 - kv == pytest.approx(total, rel=0.01)


def test_quant_file_in_lower_shows_the_types(ik_file, config_json, capsys):
    path, _ = ik_file
    code, out, err = _run(capsys, "lower", str(config_json), "--quant", str(path), "--phase", "tg")
    assert code == 0, err
    assert "iq1_kt[256,256]" in out and "iq4_ks_r4[512,256]" in out and "iq3_kt[256,512]" in out


@pytest.mark.parametrize("where", ["tensor_table", "data", "magic"])
def test_truncated_quant_file_is_rc2_one_line(ik_file, config_json, tmp_path, capsys, where):
    path, total = ik_file
    blob = path.read_bytes()
    start = read_header(path).data_start
    cut = {"tensor_table": start - 30, "data": len(blob) - 100, "magic": 2}[where]
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(blob[:cut])
    with pytest.raises(GGUFError) as ei:
        read_header(bad)
    assert str(bad) in str(ei.value) and "\n" not in str(ei.value)
    for argv in (["predict", str(config_json), "--quant", str(bad)], ["stats", str(bad)]):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and str(bad) in err and "Traceback" not in err


def test_unknown_type_id_and_missing_file(ik_file, tmp_path, capsys):
    path, _ = ik_file
    blob = bytearray(path.read_bytes())
    # the last tensor's type id (u32) sits before its offset (u64), at the end of the tensor table
    end = _table_end(path)
    blob[end - 12:end - 8] = (4242).to_bytes(4, "little")
    bad = tmp_path / "badtype.gguf"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match=r"badtype.gguf: tensor blk.1.ffn_down.weight: unknown ggml type id 4242"):
        read_header(bad)
    code, out, err = _run(capsys, "stats", "qwen3-8b", "--quant", str(tmp_path / "absent.gguf"))
    assert code == 2 and "absent.gguf: no such file" in err and err.count("\n") == 1


def _table_end(path: Path) -> int:
    from graphir.models.gguf_header import _walk

    with path.open("rb") as f:
        return _walk(f.read())[3]


def test_kv_type_on_the_cli(capsys):
    code, out, err = _run(capsys, "stats", "qwen3-8b", "--kv-type", "q6_0")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "KV bytes / token" in ln)
    assert int(line.split()[-1].replace(",", "")) == 36 * 2 * 8 * 128 * 6.5 / 8
    code, out, err = _run(capsys, "stats", "qwen3-8b", "--kv-type", "q4_k")
    assert code == 2 and "unknown KV cache type 'q4_k'" in err and err.count("\n") == 1


def test_run_refuses_an_ik_file_in_one_line(ik_file, capsys):
    pytest.importorskip("torch")
    path, _ = ik_file
    code, out, err = _run(capsys, "run", str(path), "--devices", "cpu", "--ctx", "256", "--ubatch", "64", "--tg", "4")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err
    assert "iq1_kt" in err and "cannot execute" in err


def test_gguf_types_fall_back_by_row_and_to_the_common_type():
    from graphir.quant import gguf_types

    q = gguf_types({"a.weight": dtype("iq4_ks"), "b.weight": dtype("iq4_ks"), "c.weight": dtype("q6_0"),
                    "n.weight": dtype("f32")})
    assert _t(q, "a.weight", (8, 96)) == "iq4_nl"  # a table written for another model: rows of 96
    assert _t(q, "c.weight", (8, 96)) == "q6_0"
    assert _t(q, "absent.weight", (8, 512)) == "iq4_ks" and _t(q, "absent.bias", (512,)) == "f32"
