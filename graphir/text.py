"""The canonical text form: one line per node, parsed back to an equal graph.

    graph {arch="qwen3", phase="tg"}
    %blk.3.attn_q : f32[T,4096] @cuda:0 = matmul(%blk.3.attn_norm, %blk.3.attn_q.weight)
    %blk.3.attn_norm : f32[T,4096] = rms_norm(%inp, %blk.3.attn_norm.weight) {eps=1e-06}

Attribute values: integers, floats (always with a '.', an exponent, inf or nan, so they never
read back as integers), true/false, JSON strings, and [lists]. docs/ir.md has the grammar.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from graphir.errors import GraphirError
from graphir.graph import Graph, Node
from graphir.ops import Op
from graphir.spec import TensorSpec


class ParseError(GraphirError):
    """Text that is not a graph; the message gives the line number."""


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".e") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute value {v!r}")


def _attrs(attrs: tuple[tuple[str, Any], ...]) -> str:
    return "{" + ", ".join(f"{k}={_value(v)}" for k, v in attrs) + "}"


def format_node(n: Node) -> str:
    dev = f" @{n.device}" if n.device else ""
    args = ", ".join("%" + i for i in n.inputs)
    tail = f" {_attrs(n.attrs)}" if n.attrs else ""
    specs = ", ".join(str(r) for r in n.results)
    return f"%{n.name} : {specs}{dev} = {n.op.value}({args}){tail}"


def to_text(g: Graph) -> str:
    head = f"graph {_attrs(g.meta)}" if g.meta else "graph"
    return "\n".join([head] + [format_node(n) for n in g.nodes]) + "\n"


# ---- parsing -------------------------------------------------------------------------------

_SPEC = r"\w+\[[^\]]*\]"
_NODE = re.compile(
    rf"%(?P<name>\S+) : (?P<specs>{_SPEC}(?:, {_SPEC})*)"
    r"(?: @(?P<dev>\S+))? = (?P<op>\w+)\((?P<args>[^)]*)\)(?: (?P<attrs>\{.*\}))?$"
)
_ONE_SPEC = re.compile(r"(?P<dtype>\w+)\[(?P<shape>[^\]]*)\]")
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?(?:(?:inf|nan)(?!\w)|[0-9][0-9eE.+\-]*))'
                    r'|(?P<word>[A-Za-z_]\w*)|(?P<punct>[{}\[\],=]))')


class _Attrs:
    def __init__(self, text: str) -> None:
        self.toks: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ParseError(f"bad attribute text near {text[pos:pos + 20]!r}")
            kind = m.lastgroup or ""
            self.toks.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def peek(self) -> str:
        return self.toks[self.i][1] if self.i < len(self.toks) else ""

    def next(self) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise ParseError("attributes end too early")
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, p: str) -> None:
        kind, val = self.next()
        if val != p:
            raise ParseError(f"expected {p!r} in attributes, got {val!r}")

    def value(self) -> Any:
        kind, val = self.next()
        if kind == "str":
            return json.loads(val)
        if kind == "num":
            if val in ("inf", "-inf", "nan") or any(c in val for c in ".eE"):
                return float(val)
            return int(val)
        if kind == "word" and val in ("true", "false"):
            return val == "true"
        if val == "[":
            items: list[Any] = []
            if self.peek() == "]":
                self.i += 1
                return tuple(items)
            while True:
                items.append(self.value())
                k, v = self.next()
                if v == "]":
                    return tuple(items)
                if v != ",":
                    raise ParseError(f"expected ',' or ']' in a list, got {v!r}")
        raise ParseError(f"bad attribute value {val!r}")

    def mapping(self) -> tuple[tuple[str, Any], ...]:
        self.expect("{")
        out: list[tuple[str, Any]] = []
        if self.peek() == "}":
            self.i += 1
        else:
            while True:
                kind, key = self.next()
                if kind != "word":
                    raise ParseError(f"expected an attribute name, got {key!r}")
                self.expect("=")
                out.append((key, self.value()))
                k, v = self.next()
                if v == "}":
                    break
                if v != ",":
                    raise ParseError(f"expected ',' or '}}' in attributes, got {v!r}")
        if self.i != len(self.toks):
            raise ParseError("text after the attributes")
        return tuple(out)


def _parse_attrs(text: str | None) -> tuple[tuple[str, Any], ...]:
    return _Attrs(text).mapping() if text else ()


def parse_node(line: str) -> Node:
    m = _NODE.match(line.strip())
    if m is None:
        raise ParseError(f"not a node line: {line.strip()[:80]!r}")
    try:
        op = Op(m.group("op"))
    except ValueError:
        raise ParseError(f"unknown op {m.group('op')!r}") from None
    specs = []  # one per result: a fused op with several lists them all
    for sm in _ONE_SPEC.finditer(m.group("specs")):
        shape = tuple(x.strip() for x in sm.group("shape").split(",")) if sm.group("shape").strip() else ()
        specs.append(TensorSpec(shape, sm.group("dtype")))
    raw = [a.strip() for a in m.group("args").split(",") if a.strip()]
    if any(len(a) < 2 or a[0] != "%" for a in raw):
        raise ParseError(f"bad argument list {m.group('args')!r} (arguments are %names)")
    args = tuple(a[1:] for a in raw)
    return Node(m.group("name"), op, args, specs[0], _parse_attrs(m.group("attrs")), m.group("dev"),
                tuple(specs[1:]))


def from_text(text: str) -> Graph:
    """Parse the canonical text form; errors name the line."""
    # numbered as in the file: blank and comment lines count
    lines = [(no, ln) for no, ln in enumerate(text.splitlines(), start=1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines or not lines[0][1].startswith("graph"):
        raise ParseError(f"line {lines[0][0] if lines else 1}: the text must start with 'graph'")
    head_no, head = lines[0]
    meta = head[len("graph"):].strip()
    nodes: list[Node] = []
    for no, line in lines[1:]:
        try:
            nodes.append(parse_node(line))
        except (ParseError, ValueError) as e:
            raise ParseError(f"line {no}: {e}") from None
    try:
        return Graph(tuple(nodes), _parse_attrs(meta or None))
    except ValueError as e:
        raise ParseError(f"line {head_no}: {e}") from None
