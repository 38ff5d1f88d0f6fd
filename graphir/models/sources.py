"""Model sources accepted wherever the CLI takes MODEL.

A preset name, a transformers `config.json`, a checkpoint directory holding one, or a `.gguf`
file. A source resolves to a ModelConfig plus what the file tells about weights: where they
live and, for GGUF, the storage type of every tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from graphir.dtypes import DType
from graphir.models.config import ConfigError, ModelConfig, from_hf_dict

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
        if self.kind == "gguf":
            return True
        if self.kind == "checkpoint" and self.path is not None:
            return any(self.path.glob("*.safetensors"))
        return False


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
            from graphir.models.gguf_source import read_gguf

            return read_gguf(p)
        return ModelSource(from_hf_dict(_read_json(p), name=p.parent.name or p.stem), "config", p)
    if str(spec).endswith((".json", ".gguf")) or "/" in str(spec):
        raise ConfigError(f"{spec}: no such file")
    return ModelSource(load_preset(str(spec)), "preset")


def _is_gguf(p: Path) -> bool:
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"
