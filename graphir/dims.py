"""Dimensions: integers or linear expressions over the late-bound symbols.

`T` is the number of tokens in the micro-batch, `KV` the number of cached tokens attention
sees before this batch. One graph per phase then serves a whole depth sweep: the cost
model and the executor bind the symbols, nothing is rebuilt. Expressions are kept linear
(`KV+T`, `T+128`, `T-1`) because that is all the models need, and linear forms have a
canonical spelling, which keeps the text form round-trippable.
"""

from __future__ import annotations

import re
from typing import Mapping, Union

from graphir.errors import GraphirError

SYMBOLS = ("KV", "T")  # canonical order in printed expressions

Dim = Union[int, str]  # an int, or a canonical linear expression string such as "KV+T"

_TERM = re.compile(r"([+-]?)\s*(?:(\d+)\s*\*\s*)?([A-Za-z_]\w*|\d+)")


class DimError(GraphirError):
    """A malformed or unbindable dimension."""


def _parse(expr: str) -> tuple[dict[str, int], int]:
    s = expr.replace(" ", "")
    if not s:
        raise DimError("empty dimension")
    pos, coefs, const = 0, {}, 0
    while pos < len(s):
        m = _TERM.match(s, pos)
        if m is None or m.end() == pos:
            raise DimError(f"bad dimension expression {expr!r}")
        sign = -1 if m.group(1) == "-" else 1
        if pos > 0 and not m.group(1):
            raise DimError(f"bad dimension expression {expr!r}")
        k = int(m.group(2)) if m.group(2) else 1
        atom = m.group(3)
        if atom.isdigit():
            if m.group(2):
                raise DimError(f"bad dimension expression {expr!r}")
            const += sign * int(atom)
        else:
            if atom not in SYMBOLS:
                raise DimError(f"unknown symbol {atom!r} in dimension {expr!r} (known: {', '.join(SYMBOLS)})")
            coefs[atom] = coefs.get(atom, 0) + sign * k
        pos = m.end()
    return {k: v for k, v in coefs.items() if v}, const


def _format(coefs: Mapping[str, int], const: int) -> Dim:
    parts: list[str] = []
    for sym in SYMBOLS:
        c = coefs.get(sym, 0)
        if not c:
            continue
        term = sym if abs(c) == 1 else f"{abs(c)}*{sym}"
        parts.append(("-" if c < 0 else ("+" if parts else "")) + term)
    if not parts:
        return const
    if const:
        parts.append(f"{'+' if const > 0 else '-'}{abs(const)}")
    return "".join(parts)


def dim(x: Dim) -> Dim:
    """Canonicalise: ints stay ints; expressions with no symbols become ints."""
    if isinstance(x, bool):
        raise DimError(f"bad dimension {x!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, str):
        s = x.strip()
        if re.fullmatch(r"-?\d+", s):
            return int(s)
        return _format(*_parse(s))
    raise DimError(f"bad dimension {x!r}")


def _lin(x: Dim) -> tuple[dict[str, int], int]:
    return ({}, x) if isinstance(x, int) else _parse(x)


def add(a: Dim, b: Dim) -> Dim:
    ca, ka = _lin(a)
    cb, kb = _lin(b)
    coefs = dict(ca)
    for s, c in cb.items():
        coefs[s] = coefs.get(s, 0) + c
    return _format({s: c for s, c in coefs.items() if c}, ka + kb)


def sub(a: Dim, b: Dim) -> Dim:
    cb, kb = _lin(b)
    return add(a, _format({s: -c for s, c in cb.items()}, -kb))


def scale(a: Dim, k: int) -> Dim:
    ca, ka = _lin(a)
    return _format({s: c * k for s, c in ca.items() if c * k}, ka * k)


def is_static(a: Dim) -> bool:
    return isinstance(a, int)


def symbols(a: Dim) -> tuple[str, ...]:
    return tuple(s for s in SYMBOLS if s in _lin(a)[0])


def bind(a: Dim, env: Mapping[str, int]) -> int:
    """Evaluate a dimension with concrete values for its symbols."""
    coefs, const = _lin(a)
    total = const
    for s, c in coefs.items():
        if s not in env:
            raise DimError(f"dimension {a!r} needs a value for {s}")
        total += c * int(env[s])
    return total


def mul_dims(dims: tuple[Dim, ...]) -> Dim:
    """Product of dims where at most one is symbolic (element counts of a tensor)."""
    k = 1
    sym: Dim | None = None
    for d in dims:
        if isinstance(d, int):
            k *= d
        elif sym is None:
            sym = d
        else:
            raise DimError(f"product of two symbolic dims {sym!r} and {d!r} is not linear")
    return k if sym is None else scale(sym, k)
