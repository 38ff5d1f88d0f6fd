"""`graphir place`, `graphir nodes`, `graphir passes` through cli.main.main, the one-line
errors with exit code 2, and the user pass of docs/writing_a_pass.md."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from cli.main import main
from graphir.serialize import from_json
from graphir.text import from_text
from passes import verify_placed

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing_a_pass.md"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, needle", [
    (["place", "qwen3-8b", "--split", "graph", "--ts", "-1,1"], "--ts -1,1: ratios must be finite and >= 0"),
    (["place", "qwen3-8b", "--split", "layer", "--ts", "0,0"], "ratios sum to 0"),
    (["place", "qwen3-next-80b-a3b", "--split", "graph", "--devices", "4", "--max-gpu", "4"],
     "cannot split attention over 4 devices (--max-gpu 4): 2 KV head(s)"),
    (["place", "qwen3-8b", "--split", "graph", "--devices", "2", "--max-gpu", "3"],
     "too few devices: --max-gpu 3 but 2 device(s)"),
    (["place", "qwen3-8b", "--split", "graph", "--devices", "0"], "too few devices: 0"),
    (["place", "qwen3-8b", "--split", "graph", "--devices", "2", "--ts", "3,1,1"], "3 ratio(s) for 2 device(s)"),
    (["place", "qwen3-next-80b-a3b", "--split", "layer", "--devices", "2", "--mem", "24GiB,24GiB"],
     "does not fit at ctx 4096: cuda:0 74."),
    (["place", "qwen3-8b", "--split", "rows"], "--split must be layer or graph"),
    (["place", "qwen3-8b", "--pass", "merge_qkv"], "without a device"),  # a --pass that places nothing
])
def test_errors_are_one_line_with_exit_code_2(argv: list[str], needle: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert re.search(r"\d", lines[0]) or not re.search(r"\d", needle)  # the numbers, where there are any


def test_nodes_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["nodes", "qwen3-next-80b-a3b", "--split", "graph", "--devices", "2", "--passes",
                      "merge_qkv,merge_up_gate", "--format", "json"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert {"estimate", "actual", "per_device", "heuristic"} <= doc.keys()
    assert doc["actual"] <= doc["estimate"] <= 1.05 * doc["actual"]
    assert set(doc["per_device"]) == {"cuda:0", "cuda:1"} and doc["heuristic"] == 32 * doc["n_tensors"] * 2
    rc, out, _ = run(["nodes", "llama-3-8b", "--phase", "tg", "--ubatch", "1", "--format", "json"], capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["estimate"] >= doc["actual"] and doc["heuristic"] == 65536


def test_passes_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["passes"], capsys)
    names = [ln.split()[0] for ln in out.splitlines()]
    assert rc == 0 and {"merge_qkv", "merge_up_gate", "place_layer", "place_graph", "insert_transfers"} <= set(names)


def test_place_writes_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    txt, js = tmp_path / "out" / "p.txt", tmp_path / "p.json"
    txt.parent.mkdir()  # -o never creates folders: a mistyped one is an error
    rc, _, err = run(["place", "qwen3-8b", "--split", "graph", "--devices", "cpu,cpu", "--ts", "3,1",
                      "--passes", "merge_qkv", "--phase", "tg", "--format", "text", "-o", str(txt)], capsys)
    assert rc == 0, err
    g = from_text(txt.read_text())
    verify_placed(g)
    assert g.info["devices"] == "cpu:0,cpu:1" and "blk.0.attn_qkv#1" in g
    rc, _, _ = run(["place", "qwen3-8b", "--split", "layer", "--devices", "cuda:0,cuda:1", "--format", "json",
                    "-o", str(js)], capsys)
    assert rc == 0 and from_json(js.read_text()).placed
    rc, out, _ = run(["place", "qwen3-8b", "--split", "graph", "--mem", "2x3090", "--quant", "Q4_K_M"], capsys)
    assert rc == 0 and "all_reduces 72" in out and "memory at ctx 4096: cuda:1" in out


def _doc_pass() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    code = blocks[0]
    body = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", '"""'))]
    assert len(body) <= 25
    return code


def test_the_documented_user_pass_runs_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mypasses_doc.py").write_text(_doc_pass())
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "placed.json"
    try:
        rc, _, err = run(["place", "qwen3-next-80b-a3b", "--devices", "2", "--pass", "mypasses_doc:deltanet_on_first",
                          "--passes", "merge_qkv", "--format", "json", "-o", str(out)], capsys)
    finally:
        sys.modules.pop("mypasses_doc", None)
    assert rc == 0, err
    g = from_json(out.read_text())
    verify_placed(g)
    assert {n.device for n in g.nodes if n.layer == 0} == {"cuda:0"}  # delta-net layer whole on the first
    assert g["blk.3.attn_qkv#1"].device == "cuda:1"  # attention layers split (and merged per device)
    assert g["blk.3.l_out"].device == "cuda:0,cuda:1"
