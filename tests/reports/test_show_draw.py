"""Placed-graph drawings (reports.draw): the layer view of a 48-layer model stays at a few boxes
per layer and device, shows every collective and copy, and renders to valid SVG and PNG."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from reports import draw
from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.ops import Op
from cli.place import place

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
BOX = re.compile(r"^\s*[bw]_L(\d+)_(?:mix|ffn)_(\w+) \[shape=box", re.M)  # work boxes and "waits" boxes
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def graph_split() -> Graph:
    return place("qwen3-next-80b-a3b", split="graph", devices="2", quant="IQ4_XS")[2].graph


@pytest.fixture(scope="module")
def layer_split() -> Graph:
    return place("qwen3-next-80b-a3b", split="layer", devices="2", quant="IQ4_XS")[2].graph


def boxes_per_layer_device(src: str) -> Counter[tuple[int, str]]:
    out: Counter[tuple[int, str]] = Counter()
    for m in BOX.finditer(src):
        out[(int(m.group(1)), m.group(2))] += 1
    return out


def test_parts_split_each_layer_at_the_mixer_exit(graph_split: Graph) -> None:
    p = draw.parts(graph_split)
    assert p["blk.3.attn_q#1"] == p["blk.3.attn_residual"] == "L3.mix"  # the all-reduce ends the mixer
    assert p["blk.3.ffn_up_exps#0"] == p["blk.3.l_out"] == "L3.ffn"
    assert p["blk.0.delta_net"] == "L0.mix" and p["blk.0.attn_residual.copy#1"] == "L0.ffn"
    assert p["inp_embd"] == "embed" and p["result_output"] == "head"


def test_layer_view_of_48_layers_stays_at_a_few_boxes_per_layer(graph_split: Graph) -> None:
    src = draw.layer_view(graph_split)
    counts = boxes_per_layer_device(src)
    assert {k[0] for k in counts} == set(range(48)) and {k[1] for k in counts} == {"cuda_0", "cuda_1"}
    assert max(counts.values()) <= 4
    # every all-reduce is one diamond, every copy one red edge with its bytes per token
    assert src.count("shape=diamond") == len(graph_split.by_op(Op.ALL_REDUCE)) == 60
    assert src.count('color="#C0392B", penwidth') == len(graph_split.by_op(Op.COPY)) == 37
    assert "8 KiB/tok f32" in src and "qwen3-next-80b-a3b · split graph · cuda:0, cuda:1" in src


def test_layer_view_of_layer_split_has_one_boundary_copy_and_no_collective(layer_split: Graph) -> None:
    src = draw.layer_view(layer_split)
    assert "shape=diamond" not in src and "waits" not in src.split("legend", 1)[1].split("\n", 1)[1]
    assert re.search(r"b_L23_ffn_cuda_0 -> b_L24_mix_cuda_1 .*8 KiB/tok", src)
    counts = boxes_per_layer_device(src)
    assert {d for (i, d) in counts if i < 24} == {"cuda_0"} and {d for (i, d) in counts if i >= 24} == {"cuda_1"}


def test_layer_view_limits_rows_and_refuses_unplaced_graphs(graph_split: Graph) -> None:
    src = draw.layer_view(graph_split, layers=range(2, 4))
    assert {i for i, _ in boxes_per_layer_device(src)} == {2, 3} and "b_embed" not in src
    with pytest.raises(GraphirError, match="placed graph"):
        draw.layer_view(Graph(tuple(n.with_(device=None) for n in graph_split.nodes), graph_split.meta))


@needs_dot
def test_layer_view_renders_valid_svg_with_two_device_colours(graph_split: Graph) -> None:
    svg = draw.render(draw.layer_view(graph_split), "svg")
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    fills = {e.get("fill", "").upper() for e in root.iter() if e.get("fill")}
    assert draw.LIGHT[0] in fills and draw.LIGHT[1] in fills
    titles = Counter()
    for g in root.iter(f"{SVG}g"):
        t = g.find(f"{SVG}title")
        if g.get("class") == "node" and t is not None and (m := re.match(r"b_L(\d+)_\w+_(cuda_\d)$", t.text or "")):
            titles[(int(m.group(1)), m.group(2))] += 1
    assert len(titles) == 96 and max(titles.values()) <= 4


@needs_dot
def test_renders_png_and_op_view(graph_split: Graph) -> None:
    assert draw.render(draw.layer_view(graph_split, layers=range(0, 4)), "png")[:8] == b"\x89PNG\r\n\x1a\n"
    src = draw.op_view(graph_split, [3], title="blk.3")
    assert "cluster_l0_d0" in src and "cluster_l0_d1" in src and "doubleoctagon" in src and "f32[T,2048]" in src
    root = ET.fromstring(draw.render(src, "svg"))
    names = {t.text for t in root.iter(f"{SVG}title")}
    assert {"blk.3.attn_residual", "blk.3.l_out", "blk.3.attn_q#0", "blk.3.attn_q#1", "blk.2.l_out"} <= names
    fills = {e.get("fill", "").upper() for e in root.iter() if e.get("fill")}
    assert draw.LIGHT[0] in fills and draw.LIGHT[1] in fills
    with pytest.raises(GraphirError, match="svg or png"):
        draw.render(src, "pdf")
