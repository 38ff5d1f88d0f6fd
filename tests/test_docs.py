"""Issue 15 item 10: the docs say what the code does.

Code blocks marked `<!-- runnable -->` in README.md and docs/*.md run as they are: Python blocks
of one file in one namespace, in order (`<!-- runnable: NAME.py -->` saves the block as that
module instead, as the text tells the reader to), and `graphir ...` lines of shell blocks through
the CLI, all in a temporary working folder. Also: every verb is in the README, the cited
REFERENCE sections exist in docs/reference.md, `place`/`show` default to layer split, and the
llama.cpp short options exist wherever the long one does.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from cli.main import _register, app, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- runnable(?::\s*(\S+))? -->\n```(\w*)\n(.*?)```", re.S)
ALIASES = {"--split": "-sm", "--ts": "-ts", "--ubatch": "-ub", "--ctx": "-c"}


def runnable(path: Path) -> list[tuple[str | None, str, str]]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def shell_commands(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line, comments=True)[1:] for line in joined.splitlines() if line.startswith("graphir ")]


@pytest.mark.parametrize("doc", [d for d in DOCS if runnable(d)], ids=lambda d: d.name)
def test_runnable_blocks_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict[str, object] = {"__name__": f"doc_{doc.stem}"}
    for module, lang, code in runnable(doc):
        if module:
            (tmp_path / module).write_text(code)
        elif lang == "python":
            exec(compile(code, f"{doc.name} block", "exec"), namespace)  # noqa: S102 - the docs' own code
        else:
            cmds = shell_commands(code)
            assert cmds, f"{doc.name}: a runnable shell block without graphir lines"
            for argv in cmds:
                assert main(argv) == 0, f"graphir {shlex.join(argv)}: {capsys.readouterr().err}"


def test_some_blocks_are_runnable() -> None:
    marked = {d.name for d in DOCS if runnable(d)}
    assert {"cost_model.md", "writing_a_pass.md"} <= marked


def commands() -> dict[str, click.Command]:
    _register()
    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def test_readme_lists_every_verb() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    missing = [name for name in commands() if f"`{name}`" not in table]
    assert not missing, f"README's verb table lacks {missing}"
    assert re.search(r"^graphir run ", readme, re.M)


def test_cited_reference_sections_exist() -> None:
    ref = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", ref, re.M)}
    tree = ("docs", "graphir", "passes", "backends", "bench", "tests")
    for md in [*ROOT.glob("*.md"), *(p for d in tree for p in (ROOT / d).rglob("*.md"))]:
        if md.name == "reference.md":
            continue
        text = md.read_text(encoding="utf-8")
        assert "REFERENCE.md" not in text, md
        for a, b in re.findall(r"REFERENCE §(\d+)(?:[–-](\d+))?", text):
            assert {int(a), int(b or a)} <= sections, f"{md}: REFERENCE §{a} is not in docs/reference.md"


@pytest.mark.parametrize("long, short", sorted(ALIASES.items()))
def test_llama_cpp_short_options_wherever_the_long_one_is(long: str, short: str) -> None:
    having = {name: [o for p in cmd.params for o in p.opts] for name, cmd in commands().items()}
    with_long = {name: opts for name, opts in having.items() if long in opts}
    assert with_long
    for name, opts in with_long.items():
        assert short in opts, f"{name} has {long} but not {short}"
    for name, opts in having.items():  # a short option means one thing in every verb
        if short in opts:
            assert long in opts, f"{name}: {short} without {long}"


def test_short_options_mean_the_long_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "qwen3-8b", "--split", "layer", "--ts", "3,1", "--ubatch", "512", "--ctx", "2048"]) == 0
    long = capsys.readouterr().out
    assert main(["predict", "qwen3-8b", "-sm", "layer", "-ts", "3,1", "-ub", "512", "-c", "2048"]) == 0
    assert capsys.readouterr().out == long and "u-batch 512" in long and "ctx 2048" in long


@pytest.mark.parametrize("verb", [["place", "qwen3-0.6b", "--format", "text"],
                                  ["show", "qwen3-0.6b", "--format", "text"]])
def test_place_and_show_default_to_layer_split(verb: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(verb) == 0
    default = capsys.readouterr().out
    assert main([*verb, "--split", "layer"]) == 0
    assert capsys.readouterr().out == default and 'split="layer"' in default.splitlines()[0]
