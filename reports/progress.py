"""Progress bars for long loops: drawn on stderr, and only when stderr is a terminal.

Piped or captured output (logs, CI, tests, `2> file`) stays exactly what it would be without
bars, so a bar never breaks a parser or a golden file; stdout is never touched.

API (import from `reports.progress`):

    track(items, description, total=None) -> iterator over items
        for split in track(splits, "predict"):
            ...

    bar(description, total=None) -> context manager yielding a Bar
        with bar("calibrate", total=max_iter) as b:
            for it in range(max_iter):
                ...
                b.advance()                    # one step done (b.advance(k): k steps)
                b.update(note=f"cost {c:.4f}")  # text after the bar; also completed=, total=

    enabled() -> bool: whether bars draw on stderr now.

Both `track` and `bar` take keyword-only `stream=` (default: sys.stderr, looked up at call
time) and `force=` (True or False overrides the terminal test; None decides by `isatty()`).
`total=None` draws an indeterminate bar (`track` uses `len(items)` when it exists).

Bars nest: one opened while another is live joins the same display (rich allows one live
display per console), so a search inside a sweep shows two lines. Bars are transient: they
vanish when their loop ends, leaving the terminal as the command's own output left it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, TextIO, TypeVar

X = TypeVar("X")

_live: Any = None  # the rich Progress shared by every open bar, or None
_open = 0  # bars open on it


class Bar:
    """Handle of one open bar; every method is a no-op when bars are off."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._p, self._t = progress, task

    def advance(self, steps: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, steps)

    def update(self, completed: float | None = None, total: float | None = None, note: str | None = None) -> None:
        if self._p is None:
            return
        fields: dict[str, Any] = {} if note is None else {"note": note}
        self._p.update(self._t, completed=completed, total=total, **fields)


def enabled(stream: TextIO | None = None, force: bool | None = None) -> bool:
    """Whether bars would draw on `stream` (default stderr): `force`, else is it a terminal."""
    if force is not None:
        return force
    s = stream if stream is not None else sys.stderr
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams count as "not a terminal"
        return False


def _start(stream: TextIO, force: bool | None) -> Any:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(file=stream, force_terminal=True if force else None, stderr=stream is sys.stderr)
    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 TimeRemainingColumn(), TextColumn("{task.fields[note]}"), console=console, transient=True)
    p.start()
    return p


@contextmanager
def bar(description: str, total: float | None = None, *, stream: TextIO | None = None,
        force: bool | None = None) -> Iterator[Bar]:
    """A bar for a loop you advance yourself (see the module docstring)."""
    global _live, _open
    s = stream if stream is not None else sys.stderr
    if not enabled(s, force):
        yield Bar()
        return
    if _live is None:
        _live = _start(s, force)
    _open += 1
    progress = _live
    task = progress.add_task(description, total=total, note="")
    try:
        yield Bar(progress, task)
    finally:
        progress.remove_task(task)
        _open -= 1
        if _open == 0:
            progress.stop()
            _live = None


def track(items: Iterable[X], description: str, total: float | None = None, *, stream: TextIO | None = None,
          force: bool | None = None) -> Iterator[X]:
    """Iterate over `items` with a bar advancing once per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(description, total, stream=stream, force=force) as b:
        for x in items:
            yield x
            b.advance()
