"""Hardware profiles: GPUs (rates, memory, power), links and systems, read from YAML.

The shipped profiles live in `hardware/data/*.yaml` (`gpus.yaml` is the one table of GPU
memory: the cost model, the search and `--mem 2x3090` all read it); users pass their own
files with `--hw FILE`. Every number is physical (a rate, a bandwidth, a latency, an
efficiency in 0..1) so that a profile can be checked against a datasheet or a measurement;
docs/cost_model.md says where each comes from.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from graphir.errors import GraphirError


class ProfileError(GraphirError):
    """An unknown or malformed hardware / engine profile."""


STRICT = ConfigDict(extra="forbid", frozen=True)

# When a GPU lacks a rate (no fp8 units, no separate fp16-accumulate rate), the unit that would
# run the work instead. Pairs are (missing key, replacement key, factor).
_RATE_FALLBACK: dict[str, tuple[str, float]] = {
    "fp16_acc16": ("fp16", 1.0), "bf16": ("fp16", 1.0), "tf32": ("fp32", 1.0),
    "fp8": ("fp16", 1.0), "int8": ("fp16", 2.0),
}


class GPU(BaseModel):
    model_config = STRICT
    name: str = ""
    rates: dict[str, float]  # TFLOP/s by unit/accumulate key
    mem_bw_GBps: float = Field(gt=0)
    mem_GB: float = Field(gt=0)
    tdp_W: float = Field(gt=0)
    idle_W: float = Field(ge=0)
    default_link: str = "pcie4"
    # GPU generation (ampere, ada, hopper, ...): an engine's kernels reach the same fractions of
    # the datasheet peaks on every board of one generation, so efficiencies are kept per arch
    arch: str = "ampere"
    # sustained SM clock under tensor-core load over the clock the datasheet rates (and short
    # kernel benchmarks) run at: a board held to its power or current limit clocks down when its
    # tensor cores stay busy for a whole prefill (measured: bench/bench_clocks.py). CUDA-core
    # work (decode) is not that dense and keeps the boost clock, so fp32 rates are not scaled
    tensor_clock_eff: float = Field(default=1.0, gt=0, le=1.5)
    measured: dict[str, float] = {}

    def rate(self, key: str) -> float:
        """Peak FLOP/s (not TFLOP/s) of unit `key`, falling back to the unit that would run it."""
        k, f = key, 1.0
        while k not in self.rates:
            if k not in _RATE_FALLBACK:
                raise ProfileError(f"GPU {self.name!r} has no rate {key!r} (has {', '.join(self.rates)})")
            k, g = _RATE_FALLBACK[k]
            f *= g
        clock = 1.0 if k == "fp32" else self.tensor_clock_eff
        return self.rates[k] * f * clock * 1e12


class Link(BaseModel):
    model_config = STRICT
    name: str = ""
    bw_GBps: float = Field(gt=0)  # per direction, bus rate
    eff: float = Field(gt=0, le=1)  # fraction reached by large copies
    latency_us: float = Field(ge=0)  # alpha of one transfer
    p2p: bool = True

    @property
    def beta(self) -> float:
        """Achieved bytes/s per direction."""
        return self.bw_GBps * self.eff * 1e9


class SystemSpec(BaseModel):
    model_config = STRICT
    gpu: str
    count: int = Field(ge=1)
    link: str | None = None


class System(BaseModel):
    """A resolved system: `count` identical GPUs, all pairs joined by `link`."""
    model_config = STRICT
    name: str
    gpu: GPU
    count: int
    link: Link

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(f"cuda:{i}" for i in range(self.count))

    def with_(self, **changes: Any) -> "System":
        return self.model_copy(update=changes)


# ----------------------------------------------------------------------------- loading

def read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"{where}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ProfileError(f"{where}: expected a YAML mapping")
    return doc


def data(name: str, package: str = "hardware") -> dict[str, Any]:
    """A shipped YAML file of `package`'s data folder."""
    f = resources.files(package) / "data" / name
    return read_yaml(f.read_text(encoding="utf-8"), f"shipped {name}")


def validate(model: type[BaseModel], obj: Any, where: str) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise ProfileError(f"{where}: {loc + ': ' if loc else ''}{err.get('msg', str(e))}") from None


@lru_cache(maxsize=None)
def gpus() -> dict[str, GPU]:
    return {k: validate(GPU, {**v, "name": k}, f"gpu {k}") for k, v in data("gpus.yaml")["gpus"].items()}


@lru_cache(maxsize=None)
def links() -> dict[str, Link]:
    return {k: validate(Link, {**v, "name": k}, f"link {k}") for k, v in data("links.yaml")["links"].items()}


@lru_cache(maxsize=None)
def system_specs() -> dict[str, SystemSpec]:
    return {k: validate(SystemSpec, v, f"system {k}") for k, v in data("systems.yaml")["systems"].items()}


def _gpu_named(name: str, extra: dict[str, GPU]) -> GPU:
    table = {**gpus(), **extra}
    if name in table:
        return table[name]
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    hits = [g for k, g in table.items() if key and (key == re.sub(r"[^a-z0-9]", "", k.lower())
                                                   or re.sub(r"[^a-z0-9]", "", k.lower()).endswith(key)
                                                   or re.sub(r"[^a-z0-9]", "", k.lower()).startswith(key))]
    if len(hits) == 1:
        return hits[0]
    raise ProfileError(f"unknown GPU {name!r}; known: {', '.join(table)}")


def _link_named(name: str, extra: dict[str, Link]) -> Link:
    table = {**links(), **extra}
    if name not in table:
        raise ProfileError(f"unknown link {name!r}; known: {', '.join(table)}")
    return table[name]


def _make(name: str, spec: SystemSpec, xg: dict[str, GPU], xl: dict[str, Link]) -> System:
    gpu = _gpu_named(spec.gpu, xg)
    return System(name=name, gpu=gpu, count=spec.count, link=_link_named(spec.link or gpu.default_link, xl))


def resolve_system(spec: str | Path) -> System:
    """`--hw`: a shipped system name (`2x3090`), `N x GPU[-link]` (`3xH200`, `2x4090-pcie4-p2p`),
    or a YAML file with `system: {gpu, count, link}` and optional own `gpus:` / `links:`."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ProfileError(f"{p}: no such hardware file")
        doc = read_yaml(p.read_text(encoding="utf-8"), str(p))
        xg = {k: validate(GPU, {**v, "name": k}, f"{p}: gpu {k}") for k, v in (doc.get("gpus") or {}).items()}
        xl = {k: validate(Link, {**v, "name": k}, f"{p}: link {k}") for k, v in (doc.get("links") or {}).items()}
        if "system" not in doc:
            raise ProfileError(f"{p}: needs a `system:` mapping (gpu, count, link)")
        return _make(str(doc["system"].get("name", p.stem)) if isinstance(doc["system"], dict) else p.stem,
                     validate(SystemSpec, {k: v for k, v in doc["system"].items() if k != "name"},
                               f"{p}: system"), xg, xl)
    name = str(spec)
    if name in system_specs():
        return _make(name, system_specs()[name], {}, {})
    m = re.fullmatch(r"(\d+)\s*x\s*(.+?)(?:-(pcie\d(?:-p2p)?|nvlink[\w-]*))?", name, re.IGNORECASE)
    if m:
        return _make(name, SystemSpec(gpu=m.group(2), count=int(m.group(1)), link=m.group(3)), {}, {})
    raise ProfileError(f"unknown hardware {name!r}: not a file, and systems are {', '.join(system_specs())}")


def gpu_memory(spec: str) -> tuple[int, ...] | None:
    """Bytes of memory per GPU of a hardware name (`2x3090`, `3xH200`, `2xA6000-nvlink`), or
    None when `spec` names no system (a list of sizes, a file)."""
    try:
        sysm = resolve_system(spec)
    except ProfileError:
        return None
    return tuple(int(sysm.gpu.mem_GB * 10**9) for _ in range(sysm.count))
