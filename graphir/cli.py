"""The `graphir` command line: a thin layer over library functions.

Verbs live in the modules listed in COMMAND_MODULES, each exposing `register(app)`, so the
IR stays free of torch: backends are imported only when one of their verbs runs. Every error
that is the user's input (GraphirError, OSError, JSON errors) ends as one line on stderr and
exit code 2; nothing prints a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys

import typer

from graphir.errors import GraphirError

COMMAND_MODULES = (
    "graphir.cli_ir",
    "passes.cli",
    "backends.cuda.cli",
    "backends.costmodel.cli",
    "graphir.cli_show",
    "graphir.cli_gguf",
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


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 1
    except (GraphirError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.filename}: {e.strerror or msg}"
        typer.echo(f"error: {msg}", err=True)
        return 2
    except Exception as e:  # click usage errors, or a bug: still one line, never a traceback
        if isinstance(e, _click_errors("ClickException")):
            typer.echo(f"error: {e.format_message()}", err=True)  # type: ignore[attr-defined]
            return 2
        if isinstance(e, _click_errors("Abort")):
            return 130
        typer.echo(f"error: internal error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
