"""End to end: every verb over a table of bad inputs, and Ctrl-C of every long verb.

Each case runs `python -m cli.main ARGS` as a subprocess in a folder of its own holding the
same fixture files (bad JSON and YAML, a folder, an empty file, a pass module with a syntax
error, a previous output, a measured table). A bad input must end with exit code 2, exactly
one non-empty line on stderr, no traceback, no file created, and every fixture byte for byte as
it was. The interrupt cases send SIGINT to the process group of a verb at work and expect 130,
the one line `interrupted` and no output file.

Run alone with `pytest tests/cli/test_e2e_bad_inputs.py` (or `-m e2e`), or as a script. Cases run
in parallel on a thread pool (each is a process of its own).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MEASURED = ROOT / "backends" / "costmodel" / "data" / "measured"
TABLE = "qwen3next_80b_iq4xs_q8kv_2x3090_layer.md"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": "",
       "COLUMNS": "100"}
ROOT_USER = os.geteuid() == 0  # permissions do not stop root: those cases only run as a user
QN, Q8 = "qwen3-next-80b-a3b", "qwen3-8b"

FIXTURES: dict[str, str | None] = {  # name -> text (None: a folder)
    "bad.json": '{"architectures": ["Qwen3ForCausalLM"], "hidden_size": ',
    "list.json": "[1, 2, 3]",
    "empty.json": "",
    "noarch.json": '{"hidden_size": 64}',
    "bad.yaml": "system: {gpu: [unclosed\n",
    "list.yaml": "- a\n- b\n",
    "nosystem.yaml": "gpus: {}\n",
    "badgpu.yaml": "system: {gpu: NoSuchGPU, count: 2, link: pcie4}\n",
    "zero.yaml": "system: {gpu: RTX 3090, count: 0, link: pcie4}\n",
    "badengine.yaml": "name: x\nforward_us: not-a-number\n",
    "syntax_pass.py": "def p(g:\n    return g\n",
    "import_pass.py": "import graphir_no_such_module\n\ndef p(g):\n    return g\n",
    "raising_pass.py": "raise RuntimeError('fails at import')\n",
    "attr_pass.py": "NOT_CALLABLE = 3\n\ndef p(g):\n    return g\n",
    "previous.csv": "the previous output\n",
    "previous.png": "not really a png\n",
    "bad_table.md": "| this | is |\n|---|---|\n| not | a sweep |\n",
    "bad_table.csv": "pp,tg\nx,y\n",
    "folder": None,
    "ckpt_bin": None,  # a checkpoint folder with a pickle and no safetensors (filled below)
    "ckpt_cfg": None,  # a checkpoint folder with its config only
}
_TINY = ('{"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, '
         '"num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, '
         '"rms_norm_eps": EPS, "rope_theta": 10000.0, "max_position_embeddings": 512}')
FIXTURES |= {"negeps.json": _TINY.replace("LAYERS", "2").replace("EPS", "-1"),
             "halflayers.json": _TINY.replace("LAYERS", "2.5").replace("EPS", "1e-6"),
             "hugelayers.json": _TINY.replace("LAYERS", "1000000000").replace("EPS", "1e-6")}


def fixture_folder(where: Path) -> None:
    for name, text in FIXTURES.items():
        if text is None:
            (where / name).mkdir()
        else:
            (where / name).write_text(text)
    shutil.copy(MEASURED / TABLE, where / "table.md")
    for folder in ("ckpt_bin", "ckpt_cfg"):
        (where / folder / "config.json").write_text(FIXTURES["negeps.json"].replace('"rms_norm_eps": -1', '"rms_norm_eps": 1e-6'))
    (where / "ckpt_bin" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle is never read")
    if not ROOT_USER:
        (where / "unreadable.json").write_text("{}")
        (where / "unreadable.json").chmod(0)
        (where / "readonly").mkdir()
        (where / "readonly").chmod(0o555)


def snapshot(where: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(where.rglob("*")):
        rel = str(p.relative_to(where))
        if p.is_dir():
            out[rel] = "folder"
        elif os.access(p, os.R_OK):
            out[rel] = p.read_bytes()
        else:
            out[rel] = f"mode {stat.S_IMODE(p.stat().st_mode):o}"
    return out


P = "predict"
CASES: list[list[str]] = [
    # the command line itself
    [], ["nosuchverb"], [P], [P, Q8, "--nosuch-option"], [P, Q8, "--ctx"], ["models", "extra"],
    # predict: models and files
    [P, "nosuchmodel"], [P, "missing.json"], [P, "folder"], [P, "bad.json"], [P, "list.json"], [P, "empty.json"],
    [P, "noarch.json"], [P, "missing.gguf"], [P, "previous.csv"],
    # predict: hardware and engine
    [P, Q8, "--hw", "0x3090"], [P, Q8, "--hw", "3x"], [P, Q8, "--hw", "nosuchhw"], [P, Q8, "--hw", "2xNoSuchGPU"],
    [P, Q8, "--hw", "bad.yaml"], [P, Q8, "--hw", "list.yaml"], [P, Q8, "--hw", "nosystem.yaml"],
    [P, Q8, "--hw", "badgpu.yaml"], [P, Q8, "--hw", "zero.yaml"], [P, Q8, "--hw", "missing.yaml"],
    [P, Q8, "--hw", "folder"], [P, Q8, "--engine", "nosuchengine"], [P, Q8, "--engine", "bad.yaml"],
    [P, Q8, "--engine", "badengine.yaml"], [P, Q8, "--engine", "list.yaml"],
    # predict: types and split options
    [P, Q8, "--quant", "NOPE"], [P, Q8, "--quant", ""], [P, Q8, "--kv-type", "q9_9"], [P, Q8, "--split", "rows"],
    [P, Q8, "--split", ","], [P, Q8, "-sm", "layer,rows"], [P, Q8, "--ts", "a,b"], [P, Q8, "--ts", "-1,1"],
    [P, Q8, "-ts", "1,1,1"], [P, Q8, "--ts", "0,0"], [P, Q8, "--ts", "nan,1"], [P, Q8, "--recurrent", "both"],
    [P, QN, "--split", "graph", "--max-gpu", "0"], [P, QN, "--split", "graph", "--max-gpu", "5"],
    # predict: numbers
    [P, Q8, "--ubatch", "0"], [P, Q8, "-ub", "-5"], [P, Q8, "--ubatch", "abc"], [P, Q8, "--ubatch", "1.5"],
    [P, Q8, "--ctx", "0"], [P, Q8, "-c", "-1"], [P, Q8, "--ctx", "abc"],
    [P, Q8, "--tg", "abc"], [P, Q8, "--gpus", "x"],
    # predict: outputs
    [P, Q8, "--format", "xml"], [P, Q8, "--plot", "x.jpg"], [P, Q8, "--plot", "noextension"],
    [P, Q8, "--plot", "nodir/x.png"], [P, Q8, "--plot", "folder"], [P, Q8, "-o", "nodir/x.csv"], [P, Q8, "-o", "folder"],
    [P, Q8, "-o", "."], [P, Q8, "--quant", "NOPE", "-o", "previous.csv"], [P, Q8, "--plot", "previous.png", "--ts", "x"],
    [P, Q8, "--measured", "missing.md", "--plot", "p.png"], [P, Q8, "--measured", "bad_table.md", "--plot", "p.png"],
    [P, Q8, "--measured", "folder"],
    # predict: user passes
    [P, Q8, "--pass", "nosuchmodule:p"], [P, Q8, "--pass", "syntax_pass:p"], [P, Q8, "--pass", "import_pass:p"],
    [P, Q8, "--pass", "raising_pass:p"], [P, Q8, "--pass", "attr_pass:missing"], [P, Q8, "--pass", "attr_pass:NOT_CALLABLE"],
    [P, Q8, "--pass", "no_such_registered_pass"], [P, Q8, "--pass", "merge_qkv"], [P, Q8, "--pass", ":p"],
    # timeline
    ["timeline", Q8], ["timeline", Q8, "-o", "t.gif"], ["timeline", Q8, "-o", "noextension"],
    ["timeline", "nosuchmodel", "-o", "t.png"], ["timeline", Q8, "--hw", "0x3090", "-o", "t.png"],
    ["timeline", Q8, "--split", "rows", "-o", "t.png"], ["timeline", Q8, "--depth", "-1", "-o", "t.png"],
    ["timeline", Q8, "-ub", "0", "-o", "t.png"], ["timeline", Q8, "--ts", "x", "-o", "t.csv"],
    ["timeline", Q8, "--pass", "syntax_pass:p", "-o", "t.csv"], ["timeline", Q8, "-o", "nodir/t.png"],
    ["timeline", Q8, "-o", "folder"], ["timeline", Q8, "--recurrent", "x", "-o", "t.png"],
    ["timeline", Q8, "--quant", "NOPE", "-o", "previous.csv"],
    # compare
    ["compare", "table.md"], ["compare", "table.md", "missing.md"], ["compare", "table.md", "bad_table.md"],
    ["compare", "table.md", "folder"], ["compare", "table.md", "empty.json"], ["compare", "bad_table.csv", "table.md"],
    ["compare", "table.md", "table.md", "--plot", "x.jpg"], ["compare", "table.md", "table.md", "--plot", "nodir/c.png"],
    # calibrate
    ["calibrate", "table.md"], ["calibrate", "missing.md", "--model", QN], ["calibrate", "bad_table.md", "--model", QN],
    ["calibrate", "table.md", "--model", "a,b,c"], ["calibrate", "table.md", "--model", QN, "-o", "nodir/e.yaml"],
    ["calibrate", "table.md", "--model", QN, "--hw", "0x3090"], ["calibrate", "table.md", "--model", "nosuchmodel"],
    ["calibrate", "table.md", "--model", QN, "--split", "rows"],
    # place and nodes
    ["place", "nosuchmodel"], ["place", Q8, "--split", "rows"], ["place", Q8, "--devices", "0"],
    ["place", Q8, "--devices", "abc"], ["place", Q8, "-ts", "3,1,1"], ["place", Q8, "--mem", "1XB"],
    ["place", Q8, "--format", "xml"], ["place", Q8, "-o", "nodir/p.txt"], ["place", Q8, "-c", "0"],
    ["place", Q8, "--phase", "zz"], ["place", Q8, "--pass", "syntax_pass:p"], ["place", Q8, "--max-gpu", "3", "-sm", "graph"],
    ["place", Q8, "--dump", "previous.csv"], ["place", Q8, "--pass", "merge_qkv", "-o", "previous.csv"],
    ["nodes", Q8, "--split", "auto"], ["nodes", Q8, "--format", "xml"], ["nodes", "nosuchmodel"],
    ["nodes", Q8, "--ubatch", "abc"], ["nodes", Q8, "-o", "folder"],
    # show
    ["show", Q8, "--split", "row"], ["show", Q8, "--format", "jpeg"], ["show", Q8, "--format", "png"],
    ["show", Q8, "--view", "boxes"], ["show", Q8, "--layers", "0:99"], ["show", Q8, "--layers", "abc"],
    ["show", Q8, "-o", "x.jpg"], ["show", Q8, "-o", "nodir/x.svg"], ["show", Q8, "--pass", "import_pass:p"],
    # lower and stats
    ["lower", Q8, "--phase", "zz"], ["lower", Q8, "--format", "xml"], ["lower", Q8, "--layers", "0:99"],
    ["lower", Q8, "--layers", "a:b"], ["lower", "nosuchmodel"], ["lower", Q8, "-o", "folder"],
    ["stats", Q8, "--format", "xml"], ["stats", "nosuchmodel"], ["stats", Q8, "--quant", "NOPE"],
    ["stats", Q8, "--depth", "abc"], ["passes", "--format", "xml"],
    # eval and run (torch verbs: the inputs they check themselves)
    ["eval", Q8], ["eval", Q8, "--tokens", "a,b"], ["eval", Q8, "--tokens", ""], ["eval", Q8, "--tokens", "1", "--decode", "-1"],
    ["eval", Q8, "--tokens", "1", "--dtype", "f8"], ["eval", "nosuchmodel", "--tokens", "1"],
    ["eval", Q8, "--tokens", "1", "--out", "nodir/x.npy"], ["eval", "qwen3-0.6b", "--tokens", "1,2,3", "--ctx", "1"],
    ["run", Q8, "--dtype", "f8"], ["run", Q8, "-ub", "0"], ["run", Q8, "--format", "xml"],
    ["run", Q8, "-o", "nodir/x.md"], ["run", "nosuchmodel", "--devices", "cpu"], ["run", Q8, "--split", "rows", "--devices", "cpu"],
]
CASES += [  # checked inputs: weights, limits, fit, config values (issue 15 items 2, 5, 6, 9)
    ["eval", "ckpt_bin", "--tokens", "1"], ["eval", "ckpt_cfg", "--tokens", "1"], ["run", "ckpt_bin", "--devices", "cpu"],
    [P, Q8, "--gpus", "0"], [P, Q8, "--gpus", "4"], [P, Q8, "--gpus", "-1"], [P, Q8, "--ctx", "1000000000"],
    [P, Q8, "--ctx", "99999999999999999999999"], [P, "qwen3-235b-a22b", "--hw", "2x3090", "--quant", "bf16"],
    ["stats", "hugelayers.json"], ["stats", "halflayers.json"], ["eval", "negeps.json", "--tokens", "1"],
    [P, "negeps.json"], ["eval", "qwen3-235b-a22b", "--tokens", "1", "--random-weights"],
    [P, Q8, "--engine-flags", "-sas --turbo"], [P, Q8, "--engine-flags", "-grt f8"], [P, Q8, "--engine-flags", "-ub 0"],
    [P, Q8, "--engine-flags", "-ub 2048 -b 512"], [P, Q8, "--split", "graph", "--engine-flags", "-fa off"],
    [P, Q8, "--engine-flags", "'unclosed"], [P, Q8, "--hw", "2xH200", "--engine-flags", "--no-p2p"],
    ["calibrate", "--manifest", "missing.yaml"], ["calibrate", "--manifest", "bad.yaml"],
    ["calibrate", "--manifest", "list.yaml"], ["calibrate", "--no-fit", "--cv"],
]
if not ROOT_USER:
    CASES += [[P, "unreadable.json"], [P, Q8, "-o", "readonly/x.csv"], ["timeline", Q8, "-o", "readonly/t.png"]]


def run_case(args: list[str], where: Path) -> str | None:
    """None if the case behaved, else what went wrong."""
    fixture_folder(where)
    before = snapshot(where)
    try:
        p = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=where, env=ENV, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "timed out"
    lines = p.stderr.splitlines()
    problems = []
    if p.returncode != 2:
        problems.append(f"rc {p.returncode}")
    if len(lines) != 1 or not lines[0].strip():
        problems.append(f"{len(lines)} stderr lines")
    if "Traceback" in p.stderr or "internal error" in p.stderr:
        problems.append("a bug's message")
    after = snapshot(where)
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        problems.append(f"files changed: {changed}")
    return f"{'; '.join(problems)}: {p.stderr.strip()[:300]!r}" if problems else None


def test_every_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert len(CASES) >= 100
    folders = [tmp_path / f"case{k:03d}" for k in range(len(CASES))]
    for f in folders:
        f.mkdir()
    with ThreadPoolExecutor(max_workers=max(2, min(8, 2 * (os.cpu_count() or 1)))) as pool:
        results = list(pool.map(run_case, CASES, folders))
    bad = [f"graphir {' '.join(args)}: {why}" for args, why in zip(CASES, results) if why]
    assert not bad, "\n".join(bad)


def _table_copies(n: int) -> list[str]:
    return [str(MEASURED / TABLE)] * n


LONG = {  # verb at work -> (arguments, seconds to let it work before Ctrl-C, its output file)
    "predict": ([P, QN, "--hw", "2xH200", "--engine", "graphir-cuda", "--quant", "bf16", "--split", "auto,layer,graph",
                 "-o", "out.md"], 2.0, "out.md"),
    "place": (["place", QN, "--split", "auto", "--hw", "2xH200", "--engine", "graphir-cuda", "-o", "out.txt"], 2.0,
              "out.txt"),
    "calibrate": (["calibrate", *_table_copies(40), "--model", QN, "--quant", "IQ4_XS", "--kv-type", "q8_0",
                   "--split", ",".join(["layer"] * 40), "-o", "out.yaml"], 2.0, "out.yaml"),
    "eval": (["eval", "qwen3-0.6b", "--tokens", ",".join(["7"] * 64), "--decode", "200", "--out", "out.npy"], 6.0,
             "out.npy"),
    "run": (["run", "qwen3-0.6b", "--devices", "cpu", "-ub", "128", "--tg", "8", "-c", "4096", "--no-cuda-graphs",
             "-o", "out.md"], 6.0, "out.md"),
}


def interrupt(args: list[str], wait_s: float, where: Path) -> subprocess.CompletedProcess[str] | str:
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=where, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    time.sleep(wait_s)  # stderr is no terminal, so there is no progress line to wait for
    if proc.poll() is not None:
        out, err = proc.communicate()
        return f"finished (rc {proc.returncode}) before the interrupt: {err.strip()[:200]!r}"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "did not stop within 120 s of SIGINT"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("verb", sorted(LONG))
def test_ctrl_c_of_a_long_verb_is_130_one_line_and_no_file(verb: str, tmp_path: Path) -> None:
    if verb in ("eval", "run"):
        pytest.importorskip("torch")
    args, wait_s, output = LONG[verb]
    res = interrupt(args, wait_s, tmp_path)
    assert not isinstance(res, str), res
    assert res.returncode == 130, res.stderr
    assert res.stderr.splitlines() == ["interrupted"], res.stderr
    assert sorted(os.listdir(tmp_path)) == [], f"left behind: {os.listdir(tmp_path)}"
    assert not (tmp_path / output).exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
