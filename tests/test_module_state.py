"""No module-level mutable state in backends/: what kernels choose at run time lives in the
session's KernelChoices (backends/cuda/runtime/choices.py), handed to them through ExecContext.

An AST scan of every module under backends/ fails when
- a module-level name is bound to a mutable value (a dict, list or set display, a
  comprehension, or a dict()/list()/set()/defaultdict()/... call) and is not one of the
  constant tables listed in CONSTANT_TABLES with the reason it is constant;
- a function writes into a module-level name (item assignment or deletion, or a mutating
  method such as append/update/setdefault), or declares `global`.
Tables built while the module is imported (module-level statements) are construction, not
run-time state, so only function bodies are checked for writes. functools.lru_cache on a
pure function (rope frequencies, device names) memoises a value of its arguments; it decides
nothing by timing and is not flagged.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (module, name) -> why it is a constant: written only while the module is imported
CONSTANT_TABLES: dict[tuple[str, str], str] = {
    ("backends.cuda.triton_kernels.decode_attention", "CACHE_CODES"): "cache storage -> the kernel's code, fixed",
    ("backends.cuda.triton_kernels.decode_attention", "BLOCK_BYTES"): "ggml's bytes per 32-value block, fixed",
    ("backends.costmodel", "__all__"): "the package's exported names",
    ("backends.costmodel.options", "_BOOL_ON"): "spellings of a true flag value",
    ("backends.costmodel.options", "_BOOL_OFF"): "spellings of a false flag value",
    ("backends.costmodel.options", "FLAGS"): "the engine flags a command line may give",
    ("backends.costmodel.options", "_NEUTRAL"): "llama.cpp flags that do not change the price",
    ("backends.costmodel.profiles", "RATIOS"): "the engine parameters that are ratios",
    ("backends.costmodel.rules", "_VEC_FLOPS"): "flops per element of each elementwise op",
    ("backends.costmodel.rules", "RULES"): "the cost model's rule table, one rule per op",
    ("backends.costmodel.timeline", "_REDUCE_BYTES"): "bytes per element of each wire type",
    ("backends.cuda", "_EXPORTS"): "the package's lazily imported names",
    ("backends.cuda.runtime.devices", "_TORCH"): "graphir dtype names -> torch dtypes",
    ("backends.cuda.rules.fastpath", "OVERRIDES"): "the CUDA fast kernels' part of the rule table",
    ("backends.cuda.rules.fastpath_fused", "FUSED"): "the fused ops' part of the rule table",
    ("backends.cuda.reference.kernels", "KERNELS"): "the reference rule table, one kernel per op",
    ("backends.cuda.rules.rule_table", "CUDA_KERNELS"): "the CUDA rule table assembled from its parts",
    ("backends.cuda.weights.hf_checkpoint", "TABLES"): "checkpoint tensor names per family",
    ("backends.cuda.weights.hf_checkpoint", "_TRANSFORMS"): "the tensor transforms a checkpoint rule names",
    ("backends.cuda.weights.hf_checkpoint", "_EXPERT_PARTS"): "expert tensor names per family",
    ("backends.cuda.weights.mla_weights", "_FROM_GGUF"): "GGUF tensor names of the MLA weights",
    ("backends.cuda.quant.formats", "SIZES"): "elements and bytes per block of each GGUF block format",
    ("backends.cuda.quant.formats", "_DEQUANT"): "the dequantisation function of each block format",
    ("backends.cuda.quant.repack", "WORDS"): "words per block and bits per field of each repacked layout",
}
# hf_checkpoint's rule lists (_TOP, _ATTN, ...): the parts TABLES is assembled from
_HF_PARTS = "backends.cuda.weights.hf_checkpoint"

_CONSTRUCTORS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque", "bytearray"}
_MUTATORS = {"append", "extend", "insert", "pop", "popitem", "clear", "update", "setdefault", "add",
             "discard", "remove", "sort", "reverse", "__setitem__", "__delitem__"}


def _mutable(v: ast.expr | None) -> bool:
    if isinstance(v, (ast.Dict, ast.List, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return True
    if isinstance(v, ast.Call):
        f = v.func
        return (f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)) in _CONSTRUCTORS
    if isinstance(v, ast.BinOp):
        return _mutable(v.left) or _mutable(v.right)
    return False


def _module_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import: the module body and the blocks of its if/try/with/for."""
    out: list[ast.stmt] = []
    for s in body:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        out.append(s)
        for field in ("body", "orelse", "finalbody"):
            out += _module_statements(getattr(s, field, []) or [])
        for h in getattr(s, "handlers", []) or []:
            out += _module_statements(h.body)
    return out


def _targets(s: ast.stmt) -> list[tuple[str, ast.expr | None]]:
    if isinstance(s, ast.Assign):
        return [(t.id, s.value) for t in s.targets if isinstance(t, ast.Name)]
    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name):
        return [(s.target.id, s.value)]
    return []


def _locals(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
    names |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


def _base(e: ast.expr) -> str | None:
    while isinstance(e, (ast.Subscript, ast.Attribute)) and not (
            isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name)):
        e = e.value
    return e.id if isinstance(e, ast.Name) else None


def problems(source: str, module: str) -> list[str]:
    """What in `source` (the text of `module`) is module-level mutable state."""
    tree = ast.parse(source)
    glob = set()
    out = []
    for s in _module_statements(tree.body):
        for name, value in _targets(s):
            glob.add(name)
            part = module == _HF_PARTS and name.startswith("_") and name[1:].isupper()  # _TOP, _ATTN, ...
            if _mutable(value) and (module, name) not in CONSTANT_TABLES and not part:
                out.append(f"{module}:{s.lineno}: module-level mutable {name!r} (not a listed constant table)")
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        local = _locals(fn)
        for n in ast.walk(fn):
            if isinstance(n, ast.Global):
                out.append(f"{module}:{n.lineno}: `global {', '.join(n.names)}` in {fn.name}")
            written: list[ast.expr] = []
            if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else [n.target]
                written += [t for t in targets if isinstance(t, ast.Subscript)]
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _MUTATORS:
                written.append(n.func.value)
            for w in written:
                name = _base(w)
                if name in glob and name not in local:
                    out.append(f"{module}:{n.lineno}: {fn.name} writes module-level {name!r}")
    return out


def _modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted((ROOT / "backends").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), p))
    return out


def test_backends_hold_no_module_level_mutable_state() -> None:
    found = [msg for mod, p in _modules() for msg in problems(p.read_text(), mod)]
    assert not found, "module-level mutable state (keep run-time choices in KernelChoices):\n" + "\n".join(found)


def test_every_listed_constant_table_exists() -> None:
    """The allow-list names only tables that are there (a stale entry would hide a new one)."""
    bound = set()
    for mod, p in _modules():
        for s in _module_statements(ast.parse(p.read_text()).body):
            bound |= {(mod, name) for name, _ in _targets(s)}
    assert set(CONSTANT_TABLES) <= bound, sorted(set(CONSTANT_TABLES) - bound)


def test_the_scan_finds_what_it_forbids() -> None:
    src = (
        "CHOICE: dict = {}\n"
        "SEEN = set()\n"
        "KERNELS = {}\n"
        "def pick(key, value):\n"
        "    CHOICE[key] = value\n"
        "def note(e):\n"
        "    KERNELS.setdefault('errors', []).append(e)\n"
        "def flag():\n"
        "    global BROKEN\n"
        "    BROKEN = True\n"
        "def fine(d):\n"
        "    CHOICE = {}\n"
        "    CHOICE['a'] = 1\n"
        "    d['x'] = 2\n"
    )
    got = problems(src, "backends.cuda.reference.kernels")
    assert any("mutable 'CHOICE'" in m for m in got) and any("mutable 'SEEN'" in m for m in got)
    assert not any("mutable 'KERNELS'" in m for m in got)  # a listed table ...
    assert any("note writes module-level 'KERNELS'" in m for m in got)  # ... but never written at run time
    assert any("pick writes module-level 'CHOICE'" in m for m in got)
    assert any("global BROKEN" in m for m in got)
    assert not any(" fine " in m for m in got)
    assert len(got) == 5, got
