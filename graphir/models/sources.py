"""Model sources accepted wherever the CLI takes MODEL.

A preset name, a transformers `config.json`, a checkpoint directory holding one, or a `.gguf`
file. A source resolves to a ModelConfig plus what the file tells about weights: where they
live and, for GGUF, the storage type of every tensor.

Weights are never silently random: a checkpoint directory must hold weights graphir reads
(safetensors, one file or shards with `model.safetensors.index.json`); `weights_problem` says
in one line what it found instead, before any work starts. A preset or a bare config.json has
no weights at all: verbs that execute run it on seeded random weights and say so.

The weight type every verb uses by default (`weight_scheme`): `--quant`, else a GGUF's own
per-tensor types, else the config's `torch_dtype` (bf16 when it names none): a checkpoint's
own dtype, and the documented assumption for a preset or a bare config.json.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from graphir.dtypes import DType
from graphir.errors import GraphirError
from graphir.models.config import ConfigError, ModelConfig, from_hf_dict
from graphir.models.gguf_source import read_gguf
from graphir.quant import QuantScheme, gguf_types, scheme, uniform

Kind = Literal["preset", "config", "checkpoint", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    cfg: ModelConfig
    kind: Kind
    path: Path | None = None  # the config.json, checkpoint dir or .gguf file
    tensor_types: tuple[tuple[str, DType], ...] = field(default=())  # GGUF tensor table (name, type)
    gguf_name_map: tuple[tuple[str, str], ...] = field(default=())  # graph name -> GGUF name where they differ

    @property
    def has_weights(self) -> bool:
        """A GGUF or a checkpoint directory: weights are expected (and a directory whose weights
        are unreadable is an error, see `weights_problem`); a preset or config.json has none."""
        return self.kind in ("gguf", "checkpoint")


class WeightsError(GraphirError):
    """A checkpoint directory without weights graphir reads; the message says what it holds."""


INDEX = "model.safetensors.index.json"
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files


def _safetensors_problem(f: Path) -> str | None:
    """Why `f` is not a safetensors file (its header: u64 length, then JSON), or None."""
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                return f"{f.name}: not a safetensors file (header length {n}, file size {size} bytes)"
            doc = json.loads(fh.read(n))
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 of the header
        return f"{f.name}: not a readable safetensors file ({type(e).__name__})"
    return None if isinstance(doc, dict) else f"{f.name}: safetensors header is not a JSON object"


def weights_problem(src: ModelSource) -> str | None:
    """None when `src` holds weights graphir reads, or has none by nature (preset, config.json:
    random weights are the only ones possible); else one line naming what the directory holds."""
    if src.kind != "checkpoint" or src.path is None:
        return None
    d = src.path
    index = d / INDEX
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (ValueError, AttributeError):
            return f"{d}: {INDEX} is not a JSON object with a weight_map"
        if not isinstance(wmap, dict) or not wmap:
            return f"{d}: {INDEX} has no weight_map entries"
        shards = sorted(set(str(v) for v in wmap.values()))
    else:
        shards = sorted(f.name for f in d.glob("*.safetensors"))
    if shards:
        missing = [n for n in shards if not (d / n).is_file()]
        if missing:
            return f"{d}: {INDEX} names {len(missing)} missing shard(s): {', '.join(missing[:3])}"
        for n in shards:
            why = _safetensors_problem(d / n)
            if why:
                return f"{d}: {why}"
        return None
    found = sorted(f.name for f in d.iterdir() if not f.name.startswith("."))
    pickles = [n for n in found if n.endswith(_PICKLES)]
    if pickles:
        return f"{d}: {pickles[0]}: pickle checkpoints are not read; convert to safetensors"
    ggufs = [n for n in found if n.endswith(".gguf")]
    if ggufs:
        return f"{d}: weights are in {ggufs[0]}: pass that file as MODEL"
    listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return f"{d}: no weights (found {listed}{' only' if len(found) <= 4 else ''}); " \
           f"pass --random-weights to run on random weights"


def require_weights(src: ModelSource, random_weights: bool = False) -> None:
    """Before work that executes `src`: its weights must be readable unless the user asked for
    random ones (`--random-weights`)."""
    why = None if random_weights else weights_problem(src)
    if why:
        raise WeightsError(why)


def uses_random_weights(src: ModelSource, random_weights: bool = False) -> bool:
    """Whether an execution of `src` runs on seeded random weights."""
    return random_weights or not src.has_weights


_TORCH_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def weight_scheme(src: ModelSource, quant: str | None = None) -> QuantScheme:
    """The weight types of every verb: `--quant` wins; else a GGUF's own tensor table; else the
    config's torch dtype (a checkpoint's own; assumed for a preset or bare config.json)."""
    base = uniform(_TORCH_DTYPES.get(src.cfg.torch_dtype, "bf16"))
    if quant is not None and not quant.strip():
        raise GraphirError("--quant is empty: give a file type (Q4_K_M), a ggml type (q8_0) or a GGUF file")
    if quant:
        try:
            return scheme(quant)
        except ValueError as e:
            raise GraphirError(str(e)) from None
    if src.kind == "gguf":
        return gguf_types(dict(src.tensor_types), label="gguf")
    return base


def weights_label(src: ModelSource, quant: str | None = None) -> str:
    """What the header of every verb says about weight types, e.g. `weights IQ4_XS (--quant)`,
    `weights bf16 (assumed: preset has no weights; pass --quant)`."""
    if quant:
        return f"weights {weight_scheme(src, quant).label} (--quant)"
    if src.kind == "gguf":
        counts: dict[str, int] = {}
        for _, t in src.tensor_types:
            counts[t.name] = counts.get(t.name, 0) + 1
        mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
        return f"weights the GGUF's own types ({mix})"
    label = weight_scheme(src).label
    if src.kind == "checkpoint":
        return f"weights {label} (the checkpoint's torch_dtype)"
    return f"weights {label} (assumed: {src.kind} has no weights; pass --quant)"


def preset_names() -> list[str]:
    root = resources.files("graphir.data") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None


def load_preset(name: str) -> ModelConfig:
    root = resources.files("graphir.data") / "presets"
    f = root / f"{name}.json"
    if not f.is_file():
        raise ConfigError(f"unknown model {name!r}: not a file, and presets are {', '.join(preset_names())}")
    return from_hf_dict(json.loads(f.read_text()), name=name)


def load_source(spec: str | Path) -> ModelSource:
    """Resolve MODEL: an existing path (file or directory) wins over a preset of the same name."""
    p = Path(spec)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return load_source(ggufs[0])
            raise ConfigError(f"{p}: directory has no config.json")
        return ModelSource(from_hf_dict(_read_json(cfg_file), name=p.name), "checkpoint", p)
    if p.is_file():
        if p.suffix == ".gguf" or _is_gguf(p):
            cfg, types = read_gguf(p)
            return ModelSource(cfg, "gguf", p, types)
        return ModelSource(from_hf_dict(_read_json(p), name=p.parent.name or p.stem), "config", p)
    if str(spec).endswith((".json", ".gguf")) or "/" in str(spec):
        raise ConfigError(f"{spec}: no such file")
    return ModelSource(load_preset(str(spec)), "preset")


def _is_gguf(p: Path) -> bool:
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"
