"""Issue 15 items 3 and 8: exit codes say what happened.

130 and one line (`interrupted`) when the user interrupts, whatever the verb; 2 and one line
for every bad input, validation errors and failed allocations included; 1 only for a bug.
Ctrl-C here is a KeyboardInterrupt raised by a user pass (what Python raises on SIGINT);
tests/cli/test_e2e_bad_inputs.py sends the real signal to running processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main

INTERRUPTING_PASS = '''
def stop(g):
    raise KeyboardInterrupt  # what Python raises in the verb when SIGINT arrives
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a `--pass` module into the working folder (where `--pass mod:fn` imports from)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, text: str) -> str:
        (tmp_path / f"{name}.py").write_text(text)
        return name

    return write


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("verb", [
    ["place", "qwen3-0.6b", "-o", "out.txt"],
    ["show", "qwen3-0.6b", "-o", "out.dot"],
    ["predict", "qwen3-0.6b", "--ctx", "4096", "-o", "out.csv"],
    ["timeline", "qwen3-0.6b", "-o", "out.csv"],
])
def test_interrupt_is_130_with_one_line_and_no_file(verb: list[str], user_module,
                                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mod = user_module("stopper", INTERRUPTING_PASS)
    assert main([*verb, "--pass", f"{mod}:stop"]) == 130
    cap = capsys.readouterr()
    assert one_line(cap.err) == "interrupted" and cap.out == ""
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".py" and p.name != "__pycache__") == []


@pytest.mark.parametrize("argv, needle", [
    (["predict", "qwen3-8b", "--hw", "0x3090"], "count"),
    (["timeline", "qwen3-8b", "--hw", "0x3090", "-o", "t.png"], "count"),
    (["predict", "qwen3-8b", "--plot", "x.jpg"], "x.jpg"),
    (["compare", "a.md", "b.md", "--plot", "x.gif"], "x.gif"),
    (["predict", "qwen3-8b", "-o", "no/such/folder/x.csv"], "does not exist"),
    (["predict", "qwen3-8b", "-o", "."], "directory"),
])
def test_bad_inputs_are_2_with_one_line_before_any_work(argv: list[str], needle: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert needle in one_line(cap.err) and "internal error" not in cap.err
    assert cap.out == ""  # refused before the table was printed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, needle", [
    ("def broken(g:\n    return g\n", "SyntaxError"),
    ("import graphir_no_such_package\n\ndef p(g):\n    return g\n", "graphir_no_such_package"),
    ("raise RuntimeError('boom at import')\n\ndef p(g):\n    return g\n", "boom at import"),
])
@pytest.mark.parametrize("verb", [["place", "qwen3-0.6b"], ["predict", "qwen3-0.6b", "--ctx", "4096"]])
def test_a_pass_module_that_fails_to_load_is_bad_input(text: str, needle: str, verb: list[str], user_module,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    name = f"userpass_{abs(hash((text, tuple(verb))))}"  # a fresh module name: imports are cached
    user_module(name, text)
    assert main([*verb, "--pass", f"{name}:p"]) == 2
    line = one_line(capsys.readouterr().err)
    assert needle in line and name in line and "internal error" not in line


@pytest.mark.slow
def test_running_out_of_memory_is_bad_input_with_the_size(capsys: pytest.CaptureFixture[str]) -> None:
    """A context no machine holds: the KV cache allocation fails in torch."""
    pytest.importorskip("torch")
    assert main(["eval", "qwen3-0.6b", "--tokens", "1,2", "--ctx", "100000000000"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "memory" in line and "internal error" not in line
