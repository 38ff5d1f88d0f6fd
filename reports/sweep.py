"""llama-sweep-bench tables: read and write them (comparing two is sweep_compare.py).

One row per KV depth N_KV = 0, ub, 2*ub, ...: PP = u-batch, TG = generated tokens,
S_PP = PP / T_PP, S_TG = TG / T_TG.  `read_table` detects the format by content, not by suffix
(logs get saved under any name), and skips blank lines and '#' comments:

* markdown as llama-sweep-bench prints it; extra columns (`RSS HWM`) and lines not starting with
  '|' are ignored, so a whole console capture reads;
* CSV with a header: `pp,tg,n_kv,t_pp_s,s_pp_tps,t_tg_s,s_tg_tps`, optionally with `split`;
* JSON `{"rows": [...], ...}` or a plain list of row objects;
* JSONL, one object per line, as `llama-sweep-bench --output-format jsonl` prints it
  (`pp, tg, n_kv, t_pp, speed_pp, t_tg, speed_tg` plus run metadata, which is ignored).

All seven columns are required.  Names match case-insensitively after 't/s' -> 'tps' and
punctuation -> '_' (`T_PP s` = `t_pp_s`); `_ALIASES` lists synonyms.  Speeds that disagree with
PP/T_PP are kept as printed: sweep-bench rounds T to 1 ms, so recomputing S would change it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence, TextIO

from graphir.errors import GraphirError
from graphir.fileio import write_atomic

Metric = Literal["pp", "tg"]
_FIELDS = ("pp", "tg", "n_kv", "t_pp_s", "s_pp_tps", "t_tg_s", "s_tg_tps")
# Digits written to CSV: times to 1 us (the resolution of ggml_time_us, which sweep-bench uses),
# speeds to 1e-3 t/s.  Fixed digits keep files diff-friendly and re-writing them byte-identical.
_DIGITS = {"t_pp_s": 6, "s_pp_tps": 3, "t_tg_s": 6, "s_tg_tps": 3}


# The most rows a sweep may have: 4096 rows cover a 1M-token context at u-batch 256. More is
# a typo (--ctx 1000000000) that would otherwise run for minutes and exhaust memory.
MAX_ROWS = 4096


class TableError(GraphirError):
    """Malformed or unusable sweep table; the message is one line naming the source."""


class SweepError(GraphirError):
    """A sweep that cannot be run or predicted as asked (sizes, row count)."""


def sweep_shape(ubatch: int, tg: int, ctx: int) -> tuple[int, tuple[str, ...]]:
    """(u-batch, notes) of a sweep with rows at N_KV = 0, ub, 2 ub, ... < ctx, checked before
    any work. A u-batch above ctx is clamped to ctx, as llama.cpp keeps n_ubatch <= n_ctx, and
    a note says so (the header prints it); more than MAX_ROWS rows is an error."""
    if ubatch < 1 or tg < 1 or ctx < 1:
        raise SweepError(f"--ubatch, --tg and --ctx must be positive, got {ubatch}, {tg}, {ctx}")
    notes: list[str] = []
    if ubatch > ctx:
        notes.append(f"u-batch {ubatch} clamped to the context {ctx} (llama.cpp keeps n_ubatch <= n_ctx)")
        ubatch = ctx
    rows = -(-ctx // ubatch)
    if rows > MAX_ROWS:
        raise SweepError(f"--ctx {ctx} at --ubatch {ubatch} gives {rows:,} rows, more than the {MAX_ROWS} a "
                         f"sweep may have; raise --ubatch or lower --ctx")
    return ubatch, tuple(notes)


@dataclass(frozen=True)
class SweepRow:
    pp: int
    tg: int
    n_kv: int
    t_pp_s: float
    s_pp_tps: float
    t_tg_s: float
    s_tg_tps: float
    split: str = ""

    @classmethod
    def from_times(cls, pp: int, tg: int, n_kv: int, t_pp_s: float, t_tg_s: float,
                   split: str = "") -> SweepRow:
        """Row from measured/predicted times; speeds follow sweep-bench's S = tokens / T."""
        if t_pp_s <= 0 or t_tg_s <= 0:
            raise ValueError(f"times must be positive, got t_pp_s={t_pp_s}, t_tg_s={t_tg_s}")
        return cls(pp, tg, n_kv, t_pp_s, pp / t_pp_s, t_tg_s, tg / t_tg_s, split)

    def speed(self, metric: Metric) -> float:
        if metric not in ("pp", "tg"):
            raise ValueError(f"metric must be 'pp' or 'tg', got {metric!r}")
        return self.s_pp_tps if metric == "pp" else self.s_tg_tps


@dataclass(frozen=True)
class SweepTable:
    rows: tuple[SweepRow, ...]
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(self.rows))  # a list is welcome; store immutable

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[SweepRow]:
        return iter(self.rows)

    def splits(self) -> tuple[str, ...]:
        """Distinct non-empty split names, in order of first appearance."""
        return tuple(dict.fromkeys(r.split for r in self.rows if r.split))

    def by_split(self, name: str) -> SweepTable:
        rows = tuple(r for r in self.rows if r.split == name)
        if not rows:
            raise KeyError(f"{self.label}: no split {name!r}; splits are {self.splits()}")
        return SweepTable(rows, self.label)

    def at(self, n_kv: int, split: str | None = None) -> SweepRow:
        hits = [r for r in self.rows if r.n_kv == n_kv and (split is None or r.split == split)]
        if len(hits) != 1:  # none, or one per split when the caller named no split
            raise KeyError(f"{self.label}: {len(hits)} rows at n_kv={n_kv}, split={split!r}")
        return hits[0]


# ----------------------------------------------------------------------------- reading

_ALIASES = {
    "pp": "pp", "n_pp": "pp", "tg": "tg", "n_tg": "tg", "n_kv": "n_kv", "nkv": "n_kv",
    "t_pp_s": "t_pp_s", "t_pp": "t_pp_s", "s_pp_tps": "s_pp_tps", "s_pp": "s_pp_tps",
    "speed_pp": "s_pp_tps", "t_tg_s": "t_tg_s", "t_tg": "t_tg_s", "s_tg_tps": "s_tg_tps",
    "s_tg": "s_tg_tps", "speed_tg": "s_tg_tps", "split": "split", "split_mode": "split",
}


def _canon(name: str) -> str | None:
    s = re.sub(r"[^a-z0-9]+", "_", str(name).lower().replace("t/s", "tps"))
    return _ALIASES.get(s.strip("_"))


def _require(names: Sequence[str | None] | dict[str, Any], where: str) -> None:
    if miss := [k for k in _FIELDS if k not in names]:
        raise TableError(f"{where}: missing column(s) {', '.join(miss)}")


def _num(value: Any, key: str, where: str, integer: bool) -> float:
    try:  # float() strips the padding of markdown cells; JSON true/false must not pass as 1/0
        x = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        raise TableError(f"{where}: non-numeric value {value!r} in column {key}") from None
    if not math.isfinite(x) or x < 0 or (integer and x != int(x)):
        raise TableError(f"{where}: {key} = {value!r} is not a finite non-negative "
                         f"{'integer' if integer else 'number'}")
    return x


def _row(obj: Any, where: str) -> SweepRow:
    """Row from a {column name: raw value} mapping of any format; unknown names are ignored."""
    if not isinstance(obj, dict):
        raise TableError(f"{where}: {type(obj).__name__}, not an object")
    raw: dict[str, Any] = {}
    for name, value in obj.items():
        key = _canon(name)
        if key is not None and key not in raw:  # first spelling wins, e.g. t_pp_s over t_pp
            raw[key] = value
    _require(raw, where)
    v = [_num(raw[k], k, where, i < 3) for i, k in enumerate(_FIELDS)]  # pp, tg, n_kv: ints
    split = raw.get("split")
    return SweepRow(int(v[0]), int(v[1]), int(v[2]), *v[3:],
                    split="" if split is None else str(split).strip())


def _cell_rows(src: str, hline: int, header: list[str], body: Iterable[Any]) -> list[SweepRow]:
    _require([_canon(h) for h in header], f"{src}:{hline}: header")
    rows = []
    for i, cells in body:
        if len(cells) != len(header):
            raise TableError(f"{src}:{i}: row has {len(cells)} cells, header has {len(header)}")
        rows.append(_row(dict(zip(header, cells)), f"{src}:{i}"))
    return rows


def _parse_markdown(lines: list[tuple[int, str]], src: str) -> list[SweepRow]:
    pipes = [(i, s, [c.strip() for c in s[1:-1].split("|")]) for i, s in lines if s[0] == "|"]
    start = next((k for k, (_, _, c) in enumerate(pipes) if "n_kv" in map(_canon, c)), None)
    if start is None:
        raise TableError(f"{src}: markdown table without a header row naming N_KV")
    hline, _, header = pipes[start]
    for i, s, _ in pipes[start:]:
        if not s.endswith("|"):  # sweep-bench always closes a row: a missing '|' means truncation
            raise TableError(f"{src}:{i}: row not closed by '|' (truncated?): {s[:60]!r}")
    # skip separators, and the header repeated by a concatenated second run
    body = [(i, c) for i, _, c in pipes[start + 1:]
            if c != header and not all(re.fullmatch(r":?-+:?", x) for x in c)]
    return _cell_rows(src, hline, header, body)


def _parse_csv(lines: list[tuple[int, str]], src: str) -> list[SweepRow]:
    (hline, header), *body = [(i, next(csv.reader([s]))) for i, s in lines]
    return _cell_rows(src, hline, header, body)


def _parse_json(lines: list[tuple[int, str]], src: str) -> list[SweepRow]:
    """A JSON document (a list, or an object with "rows"), else JSONL: one object per line."""
    try:
        doc = json.loads("\n".join(s for _, s in lines))
    except json.JSONDecodeError as e:
        if lines[0][1].startswith("["):
            raise TableError(f"{src}:{lines[e.lineno - 1][0]}: invalid JSON: {e.msg}") from None
        doc = None
    doc = doc["rows"] if isinstance(doc, dict) and "rows" in doc else doc
    if isinstance(doc, list):
        items = [(f"{src}: rows[{k}]", x) for k, x in enumerate(doc)]
    else:
        items = []
        for i, s in lines:
            if s.startswith("{"):  # other lines are console chatter (model loading, timings)
                try:
                    items.append((f"{src}:{i}", json.loads(s)))
                except json.JSONDecodeError as e:
                    raise TableError(f"{src}:{i}: invalid JSON line: {e.msg}") from None
    return [_row(obj, where) for where, obj in items]


def parse_table(text: str, source: str = "<text>", label: str = "") -> SweepTable:
    """Parse table text in any accepted format; `source` names it in error messages."""
    lines = [(i, s.strip()) for i, s in enumerate(text.splitlines(), 1)
             if s.strip() and not s.strip().startswith("#")]
    if not lines:
        raise TableError(f"{source}: empty (no content besides comments)")
    kind = lines[0][1][0]
    first = next(csv.reader([lines[0][1]]))
    if kind not in "|[{" and sum(_canon(c) is not None for c in first) < 3:
        # no CSV header either (that needs 3 known names): log text before the table or JSON
        kind = next((s[0] for _, s in lines if s[0] in "|{"), "?")
        if kind == "?":
            raise TableError(f"{source}:{lines[0][0]}: unknown format (not markdown, CSV or JSON)")
    rows = (_parse_markdown if kind == "|" else _parse_json if kind in "[{" else _parse_csv)(
        lines, source)
    if not rows:
        raise TableError(f"{source}: empty table (no data rows)")
    return SweepTable(tuple(rows), label)


def read_table(path: str | Path) -> SweepTable:
    """Read a sweep table file of any accepted format; the label is the file stem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = "file not found" if isinstance(e, FileNotFoundError) else type(e).__name__
        raise TableError(f"{p}: cannot read: {why}") from None
    return parse_table(text, str(p), p.stem)


# ----------------------------------------------------------------------------- writing

def write_csv(rows: Iterable[SweepRow], dest: str | Path | TextIO,
              comment: str | None = None) -> None:
    """graphir CSV (`split,pp,tg,...`); `comment` becomes leading '#' lines."""
    buf = io.StringIO()  # format everything before touching the destination
    buf.write("".join(f"# {c}\n" for c in (comment or "").splitlines()))
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("split",) + _FIELDS)
    for r in rows:
        w.writerow([r.split, r.pp, r.tg, r.n_kv]
                   + [f"{getattr(r, k):.{d}f}".rstrip("0").rstrip(".") for k, d in _DIGITS.items()])
    if isinstance(dest, (str, Path)):
        write_atomic(dest, buf.getvalue())
    else:
        dest.write(buf.getvalue())


def format_markdown(rows: Iterable[SweepRow]) -> str:
    """The table exactly as llama-sweep-bench prints it (its printf widths and precisions)."""
    out = ["|%6s | %6s | %6s | %8s | %8s | %8s | %8s |\n"
           % ("PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s"),
           "|%6s-|-%6s-|-%6s-|-%8s-|-%8s-|-%8s-|-%8s-|\n" % (("-" * 6,) * 3 + ("-" * 8,) * 4)]
    out += ["|%6d | %6d | %6d | %8.3f | %8.2f | %8.3f | %8.2f |\n"
            % (r.pp, r.tg, r.n_kv, r.t_pp_s, r.s_pp_tps, r.t_tg_s, r.s_tg_tps) for r in rows]
    return "".join(out)


def to_json(rows: Iterable[SweepRow], **extra: Any) -> str:
    """graphir JSON `{"rows": [...], "label": ..., **extra}`; floats keep full precision."""
    label = rows.label if isinstance(rows, SweepTable) and rows.label else None
    doc = {"rows": [asdict(r) for r in rows]} | ({"label": label} if label else {}) | extra
    return json.dumps(doc, indent=1) + "\n"


def to_jsonl(rows: Iterable[SweepRow]) -> str:
    """One object per row with llama-sweep-bench's JSONL keys (plus `split` when set)."""
    return "".join(json.dumps({
        "pp": r.pp, "tg": r.tg, "n_kv": r.n_kv, "t_pp": r.t_pp_s, "speed_pp": r.s_pp_tps,
        "t_tg": r.t_tg_s, "speed_tg": r.s_tg_tps} | ({"split": r.split} if r.split else {})) + "\n"
        for r in rows)
