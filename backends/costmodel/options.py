"""Engine options that change time (ik_llama.cpp's flags), parsed as a llama.cpp user types them.

`--engine-flags "-sas -grt f16 --max-gpu 2 -mqkv"` on predict / timeline / calibrate. Each flag
maps to something the cost model prices: an engine field (reduce type, NCCL, host threads,
CUDA graphs), a link property (peer access), a placement option (--max-gpu) or a graph pass
(--merge-qkv). A flag this module does not know is refused by name, never ignored: a user who
passes it expects it to matter.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from graphir.errors import GraphirError


class OptionError(GraphirError):
    """An engine flag that is unknown, malformed or impossible on the chosen rig."""


ReduceType = Literal["f16", "bf16", "f32", "q8_0"]


class EngineOptions(BaseModel):
    """What the flags say; None = the engine profile's own default."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    async_scheduler: bool | None = None  # -sas: one host thread per GPU
    max_gpu: int | None = None  # --max-gpu N: at most N GPUs per layer under graph split
    reduce_type: ReduceType | None = None  # -grt: type of the partial sums an all-reduce sends
    nccl: bool | None = None  # built with NCCL (GGML_NCCL) or not
    p2p: bool | None = None  # peer access between the GPUs on or off
    merge_qkv: bool = False  # -mqkv: Q, K, V in one tensor (one mat-mul)
    grouped_expert_routing: bool = False  # -ger: routing by expert groups (models that have them)
    merge_up_gate_experts: bool = False  # -muge: expert up and gate in one tensor
    ubatch: int | None = None  # -ub
    batch: int | None = None  # -b
    flash_attn: bool = True  # -fa on|off
    cuda_graphs: bool | None = None  # CUDA graphs (per split under graph split)
    kv_type_k: str | None = None  # -ctk
    kv_type_v: str | None = None  # -ctv


@dataclass(frozen=True)
class _Flag:
    field: str
    value: object = None  # the value a bare flag sets; None: the flag takes an argument
    parse: str = ""  # how to read the argument: int | onoff | type


_BOOL_ON = {"on", "1", "true", "yes", "auto"}
_BOOL_OFF = {"off", "0", "false", "no"}

FLAGS: dict[str, _Flag] = {
    "-sas": _Flag("async_scheduler", True), "--scheduler-async": _Flag("async_scheduler", True),
    "--max-gpu": _Flag("max_gpu", parse="int"),
    "-grt": _Flag("reduce_type", parse="type"), "--graph-reduce-type": _Flag("reduce_type", parse="type"),
    "-smf16": _Flag("reduce_type", "f16"), "-smf32": _Flag("reduce_type", "f32"),
    "--nccl": _Flag("nccl", parse="onoff"), "--no-nccl": _Flag("nccl", False),
    "--p2p": _Flag("p2p", parse="onoff"), "--no-p2p": _Flag("p2p", False),
    "-mqkv": _Flag("merge_qkv", True), "--merge-qkv": _Flag("merge_qkv", True),
    "-ger": _Flag("grouped_expert_routing", True), "--grouped-expert-routing": _Flag("grouped_expert_routing", True),
    "-muge": _Flag("merge_up_gate_experts", True), "--merge-up-gate-experts": _Flag("merge_up_gate_experts", True),
    "-ub": _Flag("ubatch", parse="int"), "--ubatch-size": _Flag("ubatch", parse="int"),
    "-b": _Flag("batch", parse="int"), "--batch-size": _Flag("batch", parse="int"),
    "-fa": _Flag("flash_attn", parse="onoff"), "--flash-attn": _Flag("flash_attn", parse="onoff"),
    "-no-fa": _Flag("flash_attn", False), "--no-flash-attn": _Flag("flash_attn", False),
    "--cuda-graphs": _Flag("cuda_graphs", parse="onoff"), "--no-cuda-graphs": _Flag("cuda_graphs", False),
    "-ctk": _Flag("kv_type_k", parse="kv"), "--cache-type-k": _Flag("kv_type_k", parse="kv"),
    "-ctv": _Flag("kv_type_v", parse="kv"), "--cache-type-v": _Flag("kv_type_v", parse="kv"),
}
# flags that do not change the time of a fully offloaded sweep: accepted, with their argument count
_NEUTRAL = {"-ngl": 1, "--n-gpu-layers": 1, "-m": 1, "--model": 1, "-t": 1, "--threads": 1, "-n": 1,
            "--warmup-batch": 0, "-wb": 0, "-c": 1, "--ctx-size": 1}


def parse_flags(text: str | None) -> EngineOptions:
    """Read llama.cpp-style flags (`"-sas -grt f16 --max-gpu 2"`) into EngineOptions."""
    if not text:
        return EngineOptions()
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise OptionError(f"--engine-flags: {e}") from None
    out: dict[str, object] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w in _NEUTRAL:
            i += 1 + _NEUTRAL[w]
            continue
        if w not in FLAGS:
            raise OptionError(f"unknown engine flag {w!r}; known: {', '.join(sorted(FLAGS))}")
        f = FLAGS[w]
        if f.value is not None:
            out[f.field] = f.value
            i += 1
            continue
        if i + 1 >= len(words):
            raise OptionError(f"engine flag {w} needs a value")
        out[f.field] = _value(w, words[i + 1], f.parse)
        i += 2
    opts = EngineOptions.model_validate(out)
    if opts.ubatch is not None and opts.batch is not None and opts.batch < opts.ubatch:
        raise OptionError(f"-b {opts.batch} is smaller than -ub {opts.ubatch}: the u-batch cannot exceed the batch")
    if opts.kv_type_k and opts.kv_type_v and opts.kv_type_k != opts.kv_type_v:
        raise OptionError(f"-ctk {opts.kv_type_k} and -ctv {opts.kv_type_v} differ; the cost model prices one KV type")
    return opts


def _value(flag: str, raw: str, how: str) -> object:
    if how == "int":
        try:
            v = int(raw)
        except ValueError:
            raise OptionError(f"engine flag {flag} needs a whole number, got {raw!r}") from None
        if v < 1:
            raise OptionError(f"engine flag {flag} must be at least 1, got {v}")
        return v
    if how == "onoff":
        if raw.lower() in _BOOL_ON:
            return True
        if raw.lower() in _BOOL_OFF:
            return False
        raise OptionError(f"engine flag {flag} takes on or off, got {raw!r}")
    if how == "type":
        if raw not in ("f16", "bf16", "f32", "q8_0"):
            raise OptionError(f"engine flag {flag} takes f16, bf16, f32 or q8_0, got {raw!r}")
        return raw
    from graphir.dtypes import dtype

    return dtype(raw).name  # a KV cache type (-ctk/-ctv): must be a known type


def apply(opts: EngineOptions, eng: "Engine", sysm: "System", split: str) -> tuple["Engine", "System", tuple[str, ...]]:
    """The engine and system the flags describe, and the graph passes they add (split: the mode
    they run under; ik_llama.cpp turns --merge-qkv off under split mode graph)."""
    from hardware.profiles import links

    upd: dict[str, object] = {}
    if opts.async_scheduler is not None:
        upd["async_scheduler"] = opts.async_scheduler
    if opts.reduce_type is not None:
        upd["reduce_type"] = opts.reduce_type
    if opts.nccl is not None:
        upd["nccl"] = opts.nccl
    if opts.cuda_graphs is False:
        upd["cuda_graphs"] = "never"
    if not opts.flash_attn:
        if split.startswith("graph"):
            raise OptionError("split mode graph needs flash attention: drop -fa off")
        upd["flash_attn"] = False
    passes: tuple[str, ...] = ()
    if opts.merge_qkv and not split.startswith("graph") and "merge_qkv" not in eng.passes:
        passes = ("merge_qkv",)
    if opts.p2p is not None and opts.p2p != sysm.link.p2p:
        name = sysm.link.name
        other = f"{name}-p2p" if opts.p2p else name.removesuffix("-p2p")
        table = links()
        if other not in table or table[other].p2p != opts.p2p:
            raise OptionError(f"link {name!r} has no variant with peer access {'on' if opts.p2p else 'off'}")
        sysm = sysm.with_(link=table[other])
    return (eng.model_copy(update=upd) if upd else eng), sysm, passes
