"""The pass manager: pipelines as data, verify after each pass, reports, dumps, registry and
`module:function` passes, errors that name the failing pass and the ones before it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from graphir.graph import Graph
from graphir.models import build
from graphir.models.sources import load_preset
from graphir.ops import Op
from passes import PassContext, PassError, register_pass, registered, resolve, run_pipeline
from helpers.passes_common import tiny_opts

CFG = load_preset("qwen3-8b").with_layers(2)


def _graph() -> Graph:
    return build(CFG, tiny_opts())


def test_pipeline_reports_times_counts_and_dumps(tmp_path: Path) -> None:
    ctx = PassContext(cfg=CFG, devices=("cpu:0", "cpu:1"))
    res = run_pipeline(_graph(), ("merge_qkv", "place_graph", "merge_up_gate"), ctx, dump_dir=tmp_path)
    assert [r.name for r in res.reports] == ["merge_qkv", "place_graph", "merge_up_gate"]
    r0, r1, r2 = res.reports
    assert r0.nodes_after == r0.nodes_before + 2 * 2  # two layers, +2 nodes each
    assert r1.nodes_after == r2.nodes_before and dict(r1.per_device).keys() == {"cpu:0", "cpu:1"}
    assert all(r.seconds >= 0 and r.verify_seconds >= 0 for r in res.reports)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00-input.txt", "01-merge_qkv.txt", "02-place_graph.txt", "03-merge_up_gate.txt"]
    assert "@cpu:1" in (tmp_path / "02-place_graph.txt").read_text()


def test_a_broken_graph_names_the_pass_and_those_before() -> None:
    def breaks(g: Graph) -> Graph:  # drops a node others read
        return g.replace_nodes(n for n in g.nodes if n.name != "blk.0.attn_norm")

    with pytest.raises(PassError, match=r"pass '.*breaks' \(after merge_qkv, merge_up_gate\) broke the graph: "
                                        r"%blk.0.attn_q.* not defined"):
        run_pipeline(_graph(), ("merge_qkv", "merge_up_gate", breaks))


def test_a_failing_pass_is_named_with_its_cause() -> None:
    def boom(g: Graph, ctx: PassContext) -> Graph:
        raise KeyError("nope")

    with pytest.raises(PassError, match=r"pass '.*boom' \(first pass\) failed: KeyError: 'nope'") as e:
        run_pipeline(_graph(), (boom, "merge_qkv"))
    assert isinstance(e.value.__cause__, KeyError)
    with pytest.raises(PassError, match="unknown pass 'nosuch'; registered: .*merge_qkv"):
        run_pipeline(_graph(), ("nosuch",))
    with pytest.raises(PassError, match="needs the model config"):
        run_pipeline(_graph(), ("place_graph",))


def test_registry_and_module_function_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    @register_pass("test_all_on_first")
    def all_on_first(g: Graph, ctx: PassContext) -> Graph:
        """Every node on the first device."""
        return g.replace_nodes(n.with_(device=ctx.devices[0]) for n in g.nodes)

    assert resolve("test_all_on_first") == ("test_all_on_first", all_on_first)
    assert resolve(all_on_first)[0] == "test_all_on_first"
    assert ("test_all_on_first", "Every node on the first device.") in [(p.name, p.doc) for p in registered()]
    out = run_pipeline(_graph(), ("test_all_on_first",), PassContext(devices=("cpu:3",))).graph
    assert {n.device for n in out.nodes} == {"cpu:3"}

    (tmp_path / "mypasses_mgr.py").write_text(
        "def only_f32(g):\n    return g.replace_nodes(n for n in g.nodes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn = resolve("mypasses_mgr:only_f32")
    assert name == "mypasses_mgr:only_f32"
    assert run_pipeline(_graph(), ("mypasses_mgr:only_f32",)).graph == _graph()
    with pytest.raises(PassError, match="has no 'missing'"):
        resolve("mypasses_mgr:missing")
    with pytest.raises(PassError, match="cannot import module"):
        resolve("no_such_module_xyz:fn")
    sys.modules.pop("mypasses_mgr", None)


def test_insert_transfers_pass_places_what_a_user_pass_left() -> None:
    def attn_on_second(g: Graph, ctx: PassContext) -> Graph:
        return g.replace_nodes(n.with_(device=ctx.devices[1]) if n.name.endswith("kqv") else n for n in g.nodes)

    res = run_pipeline(_graph(), (attn_on_second, "insert_transfers"), PassContext(devices=("cpu:0", "cpu:1")))
    assert res.graph.placed and res.graph["blk.0.kqv"].device == "cpu:1"
    assert len(res.graph.by_op(Op.COPY)) >= 2


def test_a_module_pass_registers_names_usable_earlier_in_the_pipeline(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mypasses_reg.py").write_text(
        "from passes import register_pass\n\n"
        "@register_pass('test_identity')\n"
        "def identity(g, ctx):\n    return g\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        res = run_pipeline(_graph(), ("test_identity", "mypasses_reg:identity"))
    finally:
        sys.modules.pop("mypasses_reg", None)
    assert [r.name for r in res.reports] == ["test_identity", "mypasses_reg:identity"]
