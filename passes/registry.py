"""The pass registry and what a pass reads besides the graph (`PassContext`).

Its own module so that the built-in passes (passes/builtin.py) can register themselves
without importing the manager that runs them.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from graphir.errors import GraphirError
from graphir.graph import Graph
from graphir.models.config import ModelConfig


@dataclass(frozen=True)
class PassContext:
    """What placement and user passes may read besides the graph."""

    cfg: ModelConfig | None = None
    devices: tuple[str, ...] = ("cuda:0",)
    ts: tuple[float, ...] | None = None
    max_gpu: int | None = None
    recurrent: str = "single"  # delta-net layers under graph split: single | split
    reduce_dtype: str | None = None  # type partials travel in (all_reduce dtype attr)
    mem: tuple[int, ...] | None = None  # bytes per device, for placement by memory and fit checks
    ctx_len: int = 4096
    ubatch: int = 512
    options: tuple[tuple[str, Any], ...] = ()  # free-form options for user passes

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def require_cfg(self, who: str) -> ModelConfig:
        if self.cfg is None:
            raise PassError(f"pass {who!r} needs the model config (PassContext.cfg)")
        return self.cfg


PassFn = Callable[..., Graph]
PassSpec = str | Callable[..., Graph]


class PassError(GraphirError):
    """A pass that failed or broke the graph; names the pass and the pipeline before it."""


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    fn: PassFn
    doc: str


_REGISTRY: dict[str, RegisteredPass] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Decorator: make `fn(g, ctx) -> Graph` available by name in pipelines and the CLI."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise PassError(f"bad pass name {name!r}")

    def deco(fn: PassFn) -> PassFn:
        doc = (inspect.getdoc(fn) or "").splitlines()[0] if inspect.getdoc(fn) else ""
        _REGISTRY[name] = RegisteredPass(name, fn, doc)
        return fn

    return deco


def options(**kw: Any) -> tuple[tuple[str, Any], ...]:
    """Free-form options for PassContext.options, in a stable order."""
    return tuple(sorted(kw.items()))


def context_from(mapping: Mapping[str, Any]) -> PassContext:
    """A PassContext from keyword values (unknown keys go to `options`)."""
    known = {f for f in PassContext.__dataclass_fields__}
    base = {k: v for k, v in mapping.items() if k in known}
    extra = {k: v for k, v in mapping.items() if k not in known}
    return PassContext(**base, options=options(**extra))
