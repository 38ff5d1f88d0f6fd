"""Session(keep_quant=True): matmul weights stay in their GGUF blocks (backends/cuda/quant/kept.py).

The oracle is the same file run the default way (every tensor dequantised at load): in f32 the
logits must agree within 1e-5 relative, for a prompt and greedy decode steps, unplaced, merged
(merge_qkv, merge_up_gate: same-type parts stay blocks; a join of mixed types, which these
passes do not make, is dequantised: test_cuts_keep_blocks_only_at_block_bounds) and placed
on cpu,cpu by layers and by graph split. The files hold Q8_0, Q4_0 and Q4_K matrices, and
Q4_K with Q6_K as a Q4_K_M file has them (random blocks from graphir's writer, which gguf
dequantises to weights of about N(0, 0.02)).
Under Triton's interpreter (TRITON_INTERPRET=1) the decode rows run the Triton GEMV on the CPU;
without it they run the torch fallback, and the test of the Triton choice skips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backends.cuda.quant import kept, repack
from backends.cuda.quant.formats import SIZES
from backends.cuda.quant.repack import Packed
from backends.cuda.runtime.session import Session, greedy
from backends.cuda.weights.gguf_weights import GGUFWeights
from backends.cuda.weights.loader import _Pieces
from backends.cuda.weights.sources import reference_weights
from backends.cuda.triton_kernels import fused
from cli.main import main
from cli.run import make_transform
from graphir.errors import GraphirError
from graphir.graph import Node
from graphir.ops import Op
from graphir.spec import spec
from graphir.models import from_hf_dict
from graphir.models.gguf_writer import TYPES as WRITER_TYPES, _random_blocks, write_gguf
from helpers.hf_oracle import patch_triton_interpreter

if fused.INTERPRET:
    patch_triton_interpreter()

CFG = dict(model_type="llama", vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0,
           max_position_embeddings=256, tie_word_embeddings=False)
# layer 0 mixes the types of its Q, K, V (their merge is dequantised); layer 1's are all Q8_0
TYPES = {"blk.0.attn_q.weight": "q4_k", "blk.0.attn_k.weight": "q8_0", "blk.0.attn_v.weight": "q4_0",
         "blk.0.attn_output.weight": "q8_0", "blk.0.ffn_gate.weight": "q4_0", "blk.0.ffn_up.weight": "q4_0",
         "blk.0.ffn_down.weight": "q4_k", "blk.1.attn_q.weight": "q8_0", "blk.1.attn_k.weight": "q8_0",
         "blk.1.attn_v.weight": "q8_0", "blk.1.attn_output.weight": "q4_0", "blk.1.ffn_gate.weight": "q4_k",
         "blk.1.ffn_up.weight": "q4_k", "blk.1.ffn_down.weight": "q8_0", "output.weight": "q8_0",
         "token_embd.weight": "q8_0"}
# a Q4_K_M file's choice: Q4_K, with Q6_K for attn_v, ffn_down and the output head; and Q5_0,
# llama.cpp's stand-in for a K-quant where rows are not whole 256-blocks, for two matrices
Q4_K_M = ({f"blk.{i}.{t}.weight": "q6_k" for i in range(2) for t in ("attn_v", "ffn_down")}
          | {"output.weight": "q6_k", "blk.0.attn_output.weight": "q5_0", "blk.1.ffn_up.weight": "q5_0"})
PROMPT, DECODE = [3, 14, 15, 9, 26], 4
MATRICES = 15  # 14 in the layers and the output head; the embedding table feeds get_rows


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("kq") / "tiny.gguf"
    write_gguf(p, from_hf_dict(CFG, name="tiny"), wtype="q8_0", seed=5, types=TYPES)
    return p


@pytest.fixture(scope="module")
def q4_k_m_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("kq") / "tiny-q4_k_m.gguf"
    write_gguf(p, from_hf_dict(CFG, name="tiny"), wtype="q4_k", seed=6, types=Q4_K_M)
    return p


def _run(path: Path, keep: bool, devices: str = "cpu", split: str | None = None,
         passes: str | None = None) -> tuple[Session, torch.Tensor, list[int]]:
    cfg = from_hf_dict(CFG, name="tiny")
    devs = tuple(devices.split(","))
    s = Session(path, None, devices, 32, dtype="f32", keep_quant=keep,
                transform=make_transform(cfg, devs, split, passes=passes, ctx=32))
    logits, generated = greedy(s, PROMPT, DECODE)
    return s, logits, generated


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("split,passes", [(None, None), (None, "merge_qkv,merge_up_gate"),
                                          ("layer", None), ("graph", None), ("graph", "merge_qkv,merge_up_gate")])
def test_kept_equals_dequantised(gguf_file: Path, split: str | None, passes: str | None) -> None:
    devices = "cpu" if split is None else "cpu,cpu"
    ks, got, gen = _run(gguf_file, True, devices, split, passes)
    plain, want, gen0 = _run(gguf_file, False, devices, split, passes)
    _close(got, want)
    assert gen == gen0
    assert plain.kept == {} and not any(isinstance(w, Packed) for w in plain.weights.values())
    assert set(ks.kept) <= set(repack.WORDS) and sum(ks.kept.values()) > 0
    # every kept weight is read by matmuls only; the embedding table is dense
    held = {k for k, w in ks.weights.items() if isinstance(w, Packed)}
    for g in ks.executed.values():
        for n in g.nodes:
            for i, name in enumerate(n.inputs):
                if name in held:
                    assert n.op.value == "matmul" and i == 1, n.name
    assert not isinstance(ks.weights.get("token_embd.weight"), Packed)


@pytest.mark.parametrize("split,passes", [(None, None), ("graph", "merge_qkv,merge_up_gate")])
def test_kept_equals_dequantised_q4_k_m(q4_k_m_file: Path, split: str | None, passes: str | None) -> None:
    """Q6_K (a Q4_K_M file's attn_v, ffn_down and output head) and Q5_0 are kept and multiply
    as the dequantised weights do."""
    devices = "cpu" if split is None else "cpu,cpu"
    ks, got, gen = _run(q4_k_m_file, True, devices, split, passes)
    _, want, gen0 = _run(q4_k_m_file, False, devices, split, passes)
    _close(got, want)
    assert gen == gen0
    if split is None:
        assert ks.kept == {"Q4_K": 8, "Q5_0": 2, "Q6_K": 5}
    assert isinstance(ks.weights["output.weight"], Packed) and ks.weights["output.weight"].qtype == "Q6_K"


def test_cut_inside_a_block_is_dequantised(gguf_file: Path) -> None:
    """The graph split cuts K at block bounds of these files (its column granularity follows the
    storage type), so a leaf is cut by hand here: K 16..80 of a Q8_0 weight falls inside blocks
    and loads dequantised, bit for bit the default load's cut; 32..96 stays blocks."""
    cfg = from_hf_dict(CFG, name="tiny")
    ref = reference_weights(cfg)
    src = GGUFWeights(gguf_file, cfg)
    name = "blk.1.ffn_down.weight"  # Q8_0 [256, 512]
    for (a, b), blocks in (((16, 80), False), ((32, 96), True)):
        leaf = Node(f"{name}#cut", Op.WEIGHT, (), spec("f32", 256, b - a),
                    (("src", name), ("slice_dim", 1), ("start", a), ("stop", b)))
        got = _Pieces(src, ref, [leaf], keep=True).piece(leaf, torch.device("cpu"), torch.float32)
        want = src.get(ref[name])[:, a:b]
        assert isinstance(got, Packed) == blocks
        assert torch.equal(kept.dense(got, torch.float32) if blocks else got, want)


def test_what_is_kept_unplaced(gguf_file: Path) -> None:
    s, _, _ = _run(gguf_file, True)
    assert s.kept == {"Q4_0": 4, "Q4_K": 4, "Q8_0": 7} and sum(s.kept.values()) == MATRICES
    # merged: layer 1's all-Q8_0 Q/K/V become one tensor of blocks; merge_qkv leaves layer 0's
    # Q/K/V of three types apart (the pass merges one storage type only), each kept
    m, _, _ = _run(gguf_file, True, passes="merge_qkv,merge_up_gate")
    types = {k: getattr(w, "qtype", None) for k, w in m.weights.items()}
    assert {k: v for k, v in types.items() if "qkv" in k or "gate_up" in k} == \
        {"blk.1.attn_qkv.weight": "Q8_0", "blk.0.ffn_gate_up.weight": "Q4_0", "blk.1.ffn_gate_up.weight": "Q4_K"}
    assert [types[f"blk.0.attn_{x}.weight"] for x in "qkv"] == ["Q4_K", "Q8_0", "Q4_0"]
    assert m.kept == {"Q4_0": 3, "Q4_K": 3, "Q8_0": 5}


def test_decode_choice_in_diagnostics(gguf_file: Path) -> None:
    s, _, _ = _run(gguf_file, True)
    chosen = s.choices.diagnostics()["quant_gemv"]
    assert {"256x256 Q4_K float32", "64x256 Q8_0 float32", "256x512 Q4_K float32"} <= set(chosen)
    assert set(chosen.values()) == ({"torch"} if not fused.INTERPRET else set(chosen.values()) - {"torch"})


@pytest.mark.skipif(not fused.INTERPRET, reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
def test_triton_gemv_under_interpreter(gguf_file: Path) -> None:
    """The decode rows run the Triton kernel (its default tile: the interpreter times nothing)."""
    s, got, _ = _run(gguf_file, True)
    assert set(s.choices.diagnostics()["quant_gemv"].values()) == {"8,128,4,1"}
    _, want, _ = _run(gguf_file, False)
    _close(got, want)


def test_keep_quant_needs_gguf() -> None:
    with pytest.raises(GraphirError, match="keep_quant needs weights from a GGUF file") as e:
        Session(from_hf_dict(CFG, name="tiny"), "random", "cpu", 16, keep_quant=True)
    assert len(str(e.value).splitlines()) == 1


def test_cli_eval_keep_quant(gguf_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", str(gguf_file), "--tokens", ",".join(map(str, PROMPT)), "--decode", str(DECODE)]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--keep-quant"]) == 0
    got = capsys.readouterr()
    assert got.out == plain.out and len(got.out.strip().split(",")) == DECODE
    assert "kept in GGUF blocks: 15 matmul weights (Q4_0 4, Q4_K 4, Q8_0 7)" in got.err
    assert "kept in GGUF blocks" not in plain.err


def _blocks(qtype: str, rows: int, k: int) -> np.ndarray:
    """Random blocks [rows, bytes]: the writer's, or (types it lacks: Q4_1, Q5_K, both with f16
    d and m at bytes 0 and 2) random bytes with those two set to 0.01."""
    rng = np.random.default_rng(1)
    if qtype.lower() in WRITER_TYPES:
        t = WRITER_TYPES[qtype.lower()]
        return _random_blocks(rows * k // t.block, t, rng).reshape(rows, -1)
    bs, size = SIZES[qtype]
    b = rng.integers(0, 256, size=(rows * k // bs, size), dtype=np.uint8)
    b[:, 0:4] = np.full((len(b), 2), 0.01, dtype="<f2").view(np.uint8)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(repack.WORDS))
def test_cuts_keep_blocks_only_at_block_bounds(qtype: str) -> None:
    """Rows always keep blocks; a cut along K keeps them at block bounds and gives None (the
    loader then dequantises) inside a block; what is kept is the dense cut, bit for bit."""
    rows, k, be = 6, 512, kept.block_elements(qtype)
    raw = torch.from_numpy(_blocks(qtype, rows, k))
    p = repack.repack(raw, qtype)
    full = kept.dense(p, torch.float32)
    assert torch.equal(kept.dense(kept.narrow(p, 0, 2, 5), torch.float32), full[2:5])
    cut = kept.narrow(p, 1, be, 2 * be)
    assert cut is not None and torch.equal(kept.dense(cut, torch.float32), full[:, be:2 * be])
    assert kept.narrow(p, 1, 0, be // 2) is None and kept.narrow(p, 1, 16, be + 16) is None
    both = kept.cat_rows([p, kept.narrow(p, 0, 0, 2)])
    assert both is not None and torch.equal(kept.dense(both, torch.float32), torch.cat([full, full[:2]]))
    other = repack.repack(torch.zeros(2, 34 * k // 32, dtype=torch.uint8), "Q8_0")
    assert qtype == "Q8_0" or kept.cat_rows([p, other]) is None  # mixed types: not joined


def test_cli_run_keep_quant_meta(gguf_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`graphir run --keep-quant`: the metadata counts the kept weights and names the decode choices."""
    import json

    assert main(["run", str(gguf_file), "--devices", "cpu", "--ubatch", "8", "--tg", "2", "--ctx", "8",
                 "--format", "json", "--keep-quant", "--no-cuda-graphs"]) == 0
    meta = json.loads(capsys.readouterr().out)["meta"]
    assert meta["kept_quant"] == {"Q4_0": 3, "Q4_K": 3, "Q8_0": 5}  # the engine's merges, as above
    assert any(n.startswith("kept in GGUF blocks: 11 matmul weights") for n in meta["notes"])
    assert "256x256 Q4_K float32" not in meta["fast_paths"]["quant_gemv"]  # run computes in bf16
    assert "256x512 Q4_K bfloat16" in meta["fast_paths"]["quant_gemv"]
