"""reports.progress: silent unless stderr is a terminal; bars nest and clean up after themselves."""

from __future__ import annotations

import io

import pytest

from reports import progress
from reports.progress import bar, enabled, track


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def test_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not enabled()
    assert list(track(range(5), "loop")) == [0, 1, 2, 3, 4]
    with bar("manual", total=3) as b:
        b.advance()
        b.update(completed=3, note="done")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_draws_on_a_terminal_and_cleans_up() -> None:
    tty = Tty()
    assert enabled(tty) and not enabled(Closed()) and not enabled(tty, force=False)
    assert list(track(iter("abc"), "letters", total=3, stream=tty)) == ["a", "b", "c"]
    assert "letters" in tty.getvalue() and progress._live is None


def test_nested_bars_share_one_display_and_break_closes_them() -> None:
    tty = Tty()
    with bar("outer", total=2, stream=tty) as outer:
        live = progress._live
        for i in track(range(10), "inner", stream=tty):
            assert progress._live is live and progress._open == 2
            if i == 3:
                break
        outer.advance()
    assert progress._live is None and progress._open == 0
    assert "outer" in tty.getvalue() and "inner" in tty.getvalue()


def test_forced_on_a_plain_stream() -> None:
    buf = io.StringIO()
    for _ in track([1, 2], "forced", stream=buf, force=True):
        pass
    assert "forced" in buf.getvalue() and progress._live is None
