"""The pass manager: pipelines as data, name resolution, verify after each pass, timings, dumps.

A pass is `fn(g: Graph, ctx: PassContext) -> Graph` (a one-argument `fn(g)` works too). A
pipeline is a tuple of registered names, `module:function` strings or callables:

    run_pipeline(g, ("merge_qkv", "place_graph", "mymod:my_pass"), PassContext(cfg=cfg, devices=devs))

After every pass the graph is verified (`verify`, plus the placement contract once every
node has a device); a failure names the pass and the ones before it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from graphir.errors import GraphirError
from graphir.fileio import write_atomic
from graphir.graph import Graph, verify
from graphir.models.config import ModelConfig
from graphir.text import to_text

from passes import builtin as _builtins  # noqa: F401  (registers the built-in passes on import)
from passes.count import count_nodes
from passes.registry import (_REGISTRY, PassContext, PassError, PassFn, PassSpec, RegisteredPass, context_from,
                             options, register_pass)
from passes.transfers import verify_placed

__all__ = ["PassContext", "PassError", "PassReport", "PipelineResult", "RegisteredPass", "call_pass", "check",
           "context_from", "engine_graph", "options", "register_pass", "registered", "resolve", "run_pipeline"]


def registered() -> tuple[RegisteredPass, ...]:
    return tuple(_REGISTRY[k] for k in sorted(_REGISTRY))


def resolve(spec: PassSpec) -> tuple[str, PassFn]:
    """(display name, function) for a registered name, `module:function` or a callable."""
    if callable(spec):
        for p in _REGISTRY.values():
            if p.fn is spec:
                return p.name, spec
        return f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}", spec
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        # as `python -m` does: a user's module in the working folder is importable by name
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj: Any = importlib.import_module(mod)
        except ImportError as e:
            raise PassError(f"--pass {spec}: cannot import module {mod!r} ({e})") from None
        except Exception as e:  # the user's module fails as it loads (SyntaxError, NameError, ...)
            raise PassError(f"--pass {spec}: module {mod!r} fails to load: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise PassError(f"--pass {spec}: module {mod!r} has no {attr!r}")
        if not callable(obj):
            raise PassError(f"--pass {spec}: {attr!r} is not callable")
        return spec, obj
    if spec not in _REGISTRY:
        raise PassError(f"unknown pass {spec!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return spec, _REGISTRY[spec].fn


def call_pass(fn: PassFn, g: Graph, ctx: PassContext) -> Graph:
    """fn(g, ctx) or fn(g), whichever the pass takes."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        params = []
    takes_ctx = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    return fn(g, ctx) if takes_ctx else fn(g)


@dataclass(frozen=True)
class PassReport:
    name: str
    seconds: float  # the pass itself
    verify_seconds: float
    nodes_before: int
    nodes_after: int
    per_device: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PipelineResult:
    graph: Graph
    reports: tuple[PassReport, ...] = field(default=())

    @property
    def seconds(self) -> float:
        return sum(r.seconds + r.verify_seconds for r in self.reports)


def check(g: Graph) -> None:
    """What the manager verifies after each pass: a placed graph fully (placement contract
    included), a partly placed one structurally (a user pass may assign some devices and
    leave the rest to `insert_transfers`)."""
    if g.placed:
        verify_placed(g)
    elif any(n.device for n in g.nodes):
        verify(g.replace_nodes(n.with_(device=None) if n.device else n for n in g.nodes))
    else:
        verify(g)


def run_pipeline(g: Graph, pipeline: Sequence[PassSpec], ctx: PassContext | None = None, *,
                 verify_each: bool = True, dump_dir: str | Path | None = None) -> PipelineResult:
    """Run the passes in order; verify after each; optional text dumps `NN-name.txt`."""
    ctx = ctx or PassContext()
    # `module:function` entries first: importing them may register names other entries use
    first = {k: resolve(p) for k, p in enumerate(pipeline) if isinstance(p, str) and ":" in p}
    resolved = [first[k] if k in first else resolve(p) for k, p in enumerate(pipeline)]
    done: list[str] = []
    reports: list[PassReport] = []
    if dump_dir is not None:
        _dump(dump_dir, 0, "input", g)
    for k, (name, fn) in enumerate(resolved, start=1):
        before = len(g.nodes)
        t0 = time.perf_counter()
        try:
            out = call_pass(fn, g, ctx)
        except Exception as e:  # user passes may raise anything: say which pass, keep the cause
            raise PassError(f"pass {name!r}{_after(done)} failed: {_msg(e)}") from e
        if not isinstance(out, Graph):
            raise PassError(f"pass {name!r}{_after(done)} returned {type(out).__name__}, not a Graph")
        t1 = time.perf_counter()
        if verify_each:
            try:
                check(out)
            except GraphirError as e:
                raise PassError(f"pass {name!r}{_after(done)} broke the graph: {_msg(e)}") from e
        t2 = time.perf_counter()
        reports.append(PassReport(name, t1 - t0, t2 - t1, before, len(out.nodes), count_nodes(out).per_device))
        if dump_dir is not None:
            _dump(dump_dir, k, name, out)
        g = out
        done.append(name)
    return PipelineResult(g, tuple(reports))


def _after(done: Sequence[str]) -> str:
    return f" (after {', '.join(done)})" if done else " (first pass)"


def _msg(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, GraphirError) else f"{type(e).__name__}: {text}"


def _dump(folder: str | Path, k: int, name: str, g: Graph) -> None:
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    dest = d / f"{k:02d}-{safe}.txt"
    write_atomic(dest, to_text(g))


def engine_graph(g: Graph, cfg: ModelConfig, passes: Sequence[str]) -> Graph:
    """The graph an engine executes: placed graph `g` after the engine's own passes (registered
    names or module:function, each `g -> g` or `(g, ctx) -> g`)."""
    if not passes:
        return g
    # no verify after each pass: the graph is priced on every candidate of auto's search
    return run_pipeline(g, list(passes), PassContext(cfg=cfg, devices=g.device_list()), verify_each=False).graph
