"""Placed graphs give the unplaced graph's logits (the oracle for placement).

Two small placements written here, standing in for the placement passes: whole layers on
cpu:0 / cpu:1 with copies at the boundaries, and a tensor-parallel split of attention (by KV
head groups, the KV cache split with them) and of the dense FFN (by intermediate rows), with
sliced weight leaves (`src`, `slice_dim/start/stop`) and an all_reduce after each block.
"""

from __future__ import annotations

import pytest
import torch

from backends.cuda.runtime.session import Session, greedy
from helpers.placed_models import CONFIGS, DEVS, PROMPT
from helpers.hf_oracle import torch_threads
from graphir.builder import Builder
from graphir.graph import Graph, Node
from graphir.models import ModelConfig, from_hf_dict
from graphir.ops import LEAVES, Op


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def with_copies(nodes: list[Node], meta: tuple = ()) -> Graph:
    """Give every cross-device read an explicit copy (one per value and target device)."""
    b, where = Builder(), {}
    for n in nodes:
        ins = []
        for i in n.inputs:
            src = where[i]
            if n.op in (Op.ALL_REDUCE, Op.COPY) or src == n.device or "," in src:
                ins.append(i)
                continue
            name = f"{i}.to{n.device[-1]}"
            if name not in b:
                b.emit(Op.COPY, name, i, device=n.device)
            ins.append(name)
        b.add(n.with_(inputs=tuple(ins)))
        where[n.name] = n.device
    return Graph(b.graph().nodes, meta)


def place_layers(g: Graph) -> Graph:
    """Layers split between the two devices; embedding on the first, head on the second."""
    n_layer = 1 + max(n.layer for n in g.nodes if n.layer is not None)
    out, dev = [], DEVS[0]
    for n in g.nodes:
        if n.layer is not None:
            dev = DEVS[n.layer * len(DEVS) // n_layer]
        elif n.op in LEAVES:
            dev = DEVS[0] if n.name in ("tokens", "positions", "token_embd.weight") else DEVS[-1]
        out.append(n.with_(device=dev))
    return with_copies(out, g.meta)


def tensor_parallel(cfg: ModelConfig):
    """Attention split by KV-head groups and dense FFN by rows, partial sums all-reduced."""
    hq, hkv, d, H = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.hidden_size
    g_, N = hq // hkv, cfg.intermediate_size
    kv_split, ff_split = [(0, 1), (1, hkv)], [(0, N // 3), (N // 3, N)]  # deliberately uneven

    def attention(b: Builder, i: int, T: object) -> None:
        p = f"blk.{i}."
        parts = []
        for j, (a, z) in enumerate(kv_split):
            dev, s = DEVS[j], f".d{j}"
            nq, nk = (z - a) * g_, z - a

            def w(name: str, rows: int | None, lo: int = 0, hi: int = 0, dim: int = 0, cols: int | None = None) -> str:
                shape = (rows,) if cols is None else (rows, cols)
                if dim == 1:
                    shape = (H, hi - lo)
                attrs = {"src": name} if hi == lo else {"src": name, "slice_dim": dim, "start": lo, "stop": hi}
                return b.leaf(Op.WEIGHT, name + s, b_spec(name, shape), device=dev, **attrs)

            def proj(role: str, lo: int, hi: int) -> str:
                y = b.emit(Op.MATMUL, p + role + s, p + "attn_norm", w(p + role + ".weight", hi - lo, lo, hi, cols=H),
                           device=dev)
                if cfg.attention_bias:
                    y = b.emit(Op.ADD, p + role + "_b" + s, y, w(p + role + ".bias", hi - lo, lo, hi), device=dev)
                return y

            q = b.emit(Op.RESHAPE, p + "q_heads" + s, proj("attn_q", a * g_ * d, z * g_ * d), shape=(T, nq, d), device=dev)
            k = b.emit(Op.RESHAPE, p + "k_heads" + s, proj("attn_k", a * d, z * d), shape=(T, nk, d), device=dev)
            v = b.emit(Op.RESHAPE, p + "v_heads" + s, proj("attn_v", a * d, z * d), shape=(T, nk, d), device=dev)
            if cfg.arch != "llama":  # per-head norms: weights replicated, not sliced
                q = b.emit(Op.RMS_NORM, p + "attn_q_norm" + s, q, w(p + "attn_q_norm.weight", d), device=dev,
                           eps=cfg.rms_norm_eps)
                k = b.emit(Op.RMS_NORM, p + "attn_k_norm" + s, k, w(p + "attn_k_norm.weight", d), device=dev,
                           eps=cfg.rms_norm_eps)
            rope = orig[p + "q_rope"].attr
            q = b.emit(Op.ROPE, p + "q_rope" + s, q, "positions", device=dev, **rope)
            k = b.emit(Op.ROPE, p + "k_rope" + s, k, "positions", device=dev, **rope)
            outs = []
            for kind, x in (("k", k), ("v", v)):
                st = orig[p + f"cache_{kind}"]
                c = b.leaf(Op.STATE_IN, p + f"cache_{kind}" + s, st.spec.with_shape(("KV", nk, d)), device=dev,
                           state=p + f"cache_{kind}" + s, src=p + f"cache_{kind}", slice_dim=1, start=a, stop=z)
                outs.append(b.emit(Op.KV_APPEND, p + f"cache_{kind}.next" + s, c, x, device=dev))
                b.emit(Op.OUTPUT, p + f"cache_{kind}.out" + s, outs[-1], key=p + f"cache_{kind}" + s, device=dev)
            o = b.emit(Op.ATTENTION, p + "kqv" + s, q, *outs, scale=d ** -0.5, device=dev)
            o = b.emit(Op.RESHAPE, p + "kqv_flat" + s, o, shape=(T, nq * d), device=dev)
            parts.append(b.emit(Op.MATMUL, p + "attn_output" + s, o,
                                w(p + "attn_output.weight", H, a * g_ * d, z * g_ * d, dim=1), device=dev))
        last = b.emit(Op.ALL_REDUCE, p + "attn_output", *parts, device=",".join(DEVS))
        if cfg.attention_bias:  # the bias is added once, after the reduce
            bias = b.leaf(Op.WEIGHT, p + "attn_output.bias", b_spec(p + "attn_output.bias", (H,)), device=DEVS[0])
            b.emit(Op.ADD, p + "attn_output_b", last, bias, device=DEVS[0])

    def ffn(b: Builder, i: int) -> None:
        p, parts = f"blk.{i}.", []
        for j, (lo, hi) in enumerate(ff_split):
            dev, s = DEVS[j], f".d{j}"
            ws = {r: b.leaf(Op.WEIGHT, p + f"ffn_{r}.weight" + s, b_spec(p + f"ffn_{r}.weight", shape), device=dev,
                            src=p + f"ffn_{r}.weight", slice_dim=dim, start=lo, stop=hi)
                  for r, shape, dim in (("gate", (hi - lo, H), 0), ("up", (hi - lo, H), 0), ("down", (H, hi - lo), 1))}
            gt = b.emit(Op.MATMUL, p + "ffn_gate" + s, p + "ffn_norm", ws["gate"], device=dev)
            up = b.emit(Op.MATMUL, p + "ffn_up" + s, p + "ffn_norm", ws["up"], device=dev)
            h = b.emit(Op.SWIGLU, p + "ffn_swiglu" + s, gt, up, device=dev)
            parts.append(b.emit(Op.MATMUL, p + "ffn_down" + s, h, ws["down"], device=dev))
        b.emit(Op.ALL_REDUCE, p + "ffn_down", *parts, device=",".join(DEVS))

    orig: dict[str, Node] = {}

    def b_spec(name: str, shape: tuple[int, ...]) -> object:
        return orig[name].spec.with_shape(shape)

    def rewrite(g: Graph) -> Graph:
        orig.clear()
        orig.update(g.index)
        T = g["tokens"].spec.shape[0]
        b = Builder(device=DEVS[0])
        skip = False
        for n in g.nodes:
            i = n.layer
            if n.name in (f"blk.{i}.attn_norm", f"blk.{i}.ffn_norm"):
                b.add(n.with_(device=DEVS[0]))
                skip = True
                continue
            if n.name == f"blk.{i}.attn_residual":
                attention(b, i, T)
                skip = False
            elif n.name == f"blk.{i}.l_out":
                ffn(b, i)
                skip = False
            if not skip:
                b.add(n.with_(device=DEVS[0]))
        return with_copies(list(b.graph().nodes), g.meta)

    return rewrite


def _compare(cfg: ModelConfig, transform: object, placed: bool = True) -> Session:
    ref, gen = greedy(Session(cfg, "random", "cpu", 16, seed=7), PROMPT, 3)
    s = Session(cfg, "random", "cpu:0", 16, seed=7, transform=transform)
    assert s.graphs["pp"].placed == placed and s.graphs["tg"].placed == placed
    got = torch.cat([s.prefill(PROMPT[:5]), s.prefill(PROMPT[5:]), s.decode(gen)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    return s


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_layer_placement_matches_unplaced(arch: str) -> None:
    s = _compare(from_hf_dict(CONFIGS[arch]), place_layers)
    assert s.graphs["pp"].device_list() == DEVS and s.graphs["pp"].by_op(Op.COPY)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tensor_parallel_split_matches_unplaced(arch: str) -> None:
    cfg = from_hf_dict(CONFIGS[arch])
    s = _compare(cfg, tensor_parallel(cfg))
    g = s.graphs["tg"]
    assert len(g.by_op(Op.ALL_REDUCE)) == 2 * cfg.n_layer
    assert "blk.0.cache_k.d1" in s.buffers and s.buffers["blk.0.cache_k.d1"].shape[1] == cfg.n_kv_head - 1
    sliced = s.weights["blk.0.attn_output.weight.d1"]
    assert sliced.shape == (cfg.hidden_size, (cfg.n_kv_head - 1) * (cfg.n_head // cfg.n_kv_head) * cfg.head_dim)


PIPELINES = [
    (("merge_qkv", "merge_up_gate"), {}),
    (("place_layer", "insert_transfers"), {}),
    (("place_graph", "insert_transfers"), {}),
    (("place_graph", "insert_transfers"), {"recurrent": "split"}),
    (("merge_qkv", "merge_up_gate", "place_graph", "insert_transfers"), {}),
    (("merge_siblings", "merge_qkv", "merge_up_gate"), {}),
    (("place_graph", "insert_transfers", "merge_siblings", "merge_qkv", "merge_up_gate"), {"recurrent": "split"}),
    # the shared expert folded into the routed experts (a no-op for qwen3_moe): in front of the
    # merges and of place_layer; after place_graph, which cannot split a folded layer (it folds per device)
    (("fold_shared_expert", "merge_qkv", "merge_up_gate"), {}),
    (("fold_shared_expert", "place_layer", "insert_transfers"), {}),
    (("place_graph", "insert_transfers", "fold_shared_expert"), {}),
    (("place_graph", "insert_transfers", "fold_shared_expert"), {"recurrent": "split"}),
    (("fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate"), {}),
    (("place_graph", "insert_transfers", "fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate"),
     {"recurrent": "split"}),
    # the CUDA backend's default passes (graphir run), after each placement
    (("fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate", "contiguous_heads",
      "fuse_delta_net_gates"), {}),
    (("place_layer", "insert_transfers", "fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate",
      "contiguous_heads", "fuse_delta_net_gates"), {}),
    (("place_graph", "insert_transfers", "fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate",
      "contiguous_heads", "fuse_delta_net_gates"), {"recurrent": "split"}),
    (("place_graph", "insert_transfers", "contiguous_heads", "fuse_delta_net_gates"), {}),
]


@pytest.mark.parametrize("pipeline,options", PIPELINES, ids=lambda p: "+".join(p) if isinstance(p, tuple) else str(p))
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_next"])
def test_placement_passes_match_unplaced(arch: str, pipeline: tuple[str, ...], options: dict) -> None:
    """The project's own passes (merges, layer and graph split) through the executor."""
    passes = pytest.importorskip("passes")
    cfg = from_hf_dict(CONFIGS[arch])
    pctx = passes.PassContext(cfg=cfg, devices=DEVS, **options)
    placed = any(p.startswith("place_") for p in pipeline)  # merges alone leave the graph unplaced
    s = _compare(cfg, lambda g: passes.run_pipeline(g, pipeline, pctx).graph, placed)
    if "merge_qkv" in pipeline and arch == "qwen3_moe":
        # merged weights are load-time constants: folded once, the separate leaves freed
        assert not s.executed["tg"].by_op(Op.CONCAT)
        assert not any(k.startswith("blk.0.attn_q.weight") for k in s.weights)
    if "fold_shared_expert" in pipeline and arch == "qwen3_next":
        topks = s.graphs["tg"].by_op(Op.MOE_TOPK)
        assert topks and all(n.attr.get("shared") == 1 for n in topks)
    if "fuse_delta_net_gates" in pipeline and arch == "qwen3_next":
        dns = s.graphs["tg"].by_op(Op.DELTA_NET)
        assert dns and all(n.attr.get("raw_gates") for n in dns)  # every piece's chain matched
        assert not s.graphs["tg"].by_op(Op.SOFTPLUS)
    if "contiguous_heads" in pipeline and arch == "qwen3_next":
        # the per-head pieces of the projections are views now: no reshape of a strided slice
        g = s.graphs["tg"]
        assert not [n for n in g.nodes if n.op == Op.CONCAT and ".conv_x" in n.name]
        assert [n for n in g.nodes if n.name.endswith(".cols") or ".cols#" in n.name]  # and it did rewrite


MANY = [  # (devices, pipeline, options): the 4- and 8-GPU placements of the multi-GPU runs
    (4, ("place_layer", "insert_transfers"), {}),
    (4, ("place_graph", "insert_transfers", "merge_siblings", "merge_qkv", "merge_up_gate"), {}),
    (4, ("place_graph", "insert_transfers"), {"max_gpu": 2, "recurrent": "split"}),
    (8, ("place_layer", "insert_transfers"), {}),
    (8, ("place_graph", "insert_transfers"), {"recurrent": "split"}),
    (8, ("place_graph", "insert_transfers", "merge_qkv", "merge_up_gate"), {"max_gpu": 2}),
]


@pytest.mark.parametrize("n,pipeline,options", MANY, ids=lambda p: "+".join(p) if isinstance(p, tuple) else str(p))
@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_four_and_eight_devices_match_unplaced(arch: str, n: int, pipeline: tuple[str, ...], options: dict) -> None:
    """Logical CPU devices stand in for 4 and 8 GPUs: every device holds a part, and the
    placed graph still computes the unplaced graph's logits."""
    passes = pytest.importorskip("passes")
    cfg = from_hf_dict(CONFIGS[arch])
    devs = tuple(f"cpu:{k}" for k in range(n))
    pctx = passes.PassContext(cfg=cfg, devices=devs, **options)
    s = _compare(cfg, lambda g: passes.run_pipeline(g, pipeline, pctx).graph)
    used = s.graphs["pp"].device_list()
    assert len(used) >= min(n, 3), used  # three layers (four for qwen3_next) spread over the devices


@pytest.mark.parametrize("n", [4, 8])
def test_auto_on_four_and_eight_devices_matches_unplaced(n: int) -> None:
    from cli.run import make_transform

    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    devs = tuple(f"cpu:{k}" for k in range(n))
    s = _compare(cfg, make_transform(cfg, devs, "auto", ubatch=8, tg=4, ctx=16, hw=f"{n}xH200"))
    assert len(s.graphs["pp"].device_list()) > 1


def test_loading_two_layouts_holds_one_full_tensor_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill sliced over four devices, decode whole on a home device (auto's plans): the
    loader cuts every piece of a source tensor together, so it never holds more than one full
    tensor (it held every expert tensor of the model at once before, and ran out of memory)."""
    from backends.cuda.weights import loader
    from passes import merge_up_gate, place_graph, place_layer

    cfg = from_hf_dict(CONFIGS["qwen3_next"])
    devs = tuple(f"cpu:{k}" for k in range(4))
    peak = [0]
    get = loader._Pieces._get

    def counting(self, name, node, device, dtype):  # type: ignore[no-untyped-def]
        t = get(self, name, node, device, dtype)
        peak[0] = max(peak[0], len(self.full))
        return t

    monkeypatch.setattr(loader._Pieces, "_get", counting)

    def two_layouts(g: Graph) -> Graph:
        return place_graph(g, cfg, devs) if g.info.get("phase") == "pp" else place_layer(g, cfg, devs)

    s = Session(cfg, "random", "cpu:0", 16, seed=7, transform=[two_layouts, merge_up_gate])  # loading is the point
    assert peak[0] <= 2
    assert s.graphs["pp"].by_op(Op.ALL_REDUCE) and not s.graphs["tg"].by_op(Op.ALL_REDUCE)
