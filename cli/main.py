"""The `graphir` command line: a thin layer over library functions.

Verbs live in the modules listed in COMMAND_MODULES, each exposing `register(app)`, so the
IR stays free of torch: backends are imported only when one of their verbs runs. Every error
that is the user's input (GraphirError, OSError, JSON errors, pydantic validation, a failed
allocation) ends as one line on stderr and exit code 2; Ctrl-C as `interrupted` and 130; a bug
as `internal error ...` and 1; nothing prints a traceback.
"""

from __future__ import annotations

import importlib
import json
import re
import sys

import typer

from graphir.errors import GraphirError

COMMAND_MODULES = (
    "cli.ir",
    "cli.place",
    "cli.run",
    "cli.predict",
    "cli.show",
    "cli.gguf",
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lower LLMs to an IR, place them on GPUs, run them, predict their speed.")


def _register() -> None:
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue  # a backend not built yet: its verbs are simply absent
            raise
        m.register(app)


def fail(msg: str, code: int = 2) -> None:
    """Print a one-line error and exit."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _click_errors(name: str) -> tuple[type, ...]:
    """click's exception class `name`, and typer's vendored copy of it (typer >= 0.2x raises that)."""
    import click

    out: list[type] = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # type: ignore[import-not-found]

        out.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(out)


def _validation_message(e: Exception) -> str:
    """A pydantic ValidationError on one line: the model, the field, the problem, the value."""
    errs = e.errors()  # type: ignore[attr-defined]
    err = errs[0] if errs else {}
    loc = ".".join(str(x) for x in err.get("loc", ()))
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
    more = f"; and {len(errs) - 1} more" if len(errs) > 1 else ""
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"invalid {getattr(e, 'title', 'value')}: {loc + ': ' if loc else ''}{msg}{got}{more}"


def _out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (torch CUDA/CPU, numpy, Python), else None."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return f"out of memory: {text}" if text else "out of memory"
    if isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()):
        asked = re.search(r"tried to allocate (\d+) bytes", text)  # torch's CPU allocator
        if asked:
            n = int(asked.group(1))
            return f"out of memory: an allocation of {n:,} bytes ({n / 2**30:,.1f} GiB) failed"
        return f"out of memory: {text}"
    return None


def _message(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) of an exception that escaped a verb: 2 for the user's
    input, 1 for a bug."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or first}", 2
    if isinstance(e, (GraphirError, OSError, json.JSONDecodeError, UnicodeDecodeError)):
        return first, 2
    if type(e).__name__ == "ValidationError" and type(e).__module__.startswith("pydantic"):
        return _validation_message(e), 2  # type: ignore[arg-type]
    if isinstance(e, _click_errors("ClickException")):  # usage errors; no arguments: help, then this
        return e.format_message() or "no command given (graphir --help lists the verbs)", 2  # type: ignore[attr-defined]
    oom = _out_of_memory(e)
    if oom:
        return oom, 2
    return f"internal error {type(e).__name__}: {first if str(e).strip() else ''}", 1


def main(argv: list[str] | None = None) -> int:
    """Run one verb; the exit code is 0, 2 (bad input, one line on stderr), 130 (interrupted)
    or 1 (a bug, still one line)."""
    try:
        _register()
        # standalone_mode=False: typer returns typer.Exit's code (130 for Ctrl-C) instead of exiting
        rv = app(args=argv, standalone_mode=False)
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except KeyboardInterrupt:
        code = 130
    except typer.Exit as e:
        code = int(e.exit_code or 0)
    except SystemExit as e:
        code = int(e.code or 0) if isinstance(e.code, int) else 1
    except Exception as e:  # the user's input or a bug: one line, never a traceback
        if isinstance(e, _click_errors("Abort")):
            code = 130
        else:
            msg, code = _message(e)
            typer.echo(f"error: {msg}", err=True)
            return code
    if code == 130:
        typer.echo("interrupted", err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
