"""Engine profiles: the cost model's physical parameters of one inference engine, from YAML.

The shipped profiles live in `backends/costmodel/data/engine_*.yaml`; users pass their own
with `--engine FILE` (GPUs, links and systems: hardware/profiles.py). Every number is physical (a rate, a bandwidth, a latency, an
efficiency in 0..1) so that a profile can be checked against a datasheet or a measurement;
docs/cost_model.md says where each comes from.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from graphir.dtypes import dtype
from hardware.profiles import GPU, ProfileError, data, read_yaml, validate

_Strict = ConfigDict(extra="forbid", frozen=True)


class ARRule(BaseModel):
    """One all-reduce algorithm choice; the first rule whose conditions hold is used."""
    model_config = _Strict
    algo: Literal["ring", "one_shot", "gather_bcast", "nccl"]
    max_gpus: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    p2p: bool | None = None
    nccl: bool | None = None  # the rule holds only with (True) or without (False) NCCL

    def applies(self, gpus: int, tokens: int, p2p: bool, nccl: bool = True) -> bool:
        return ((self.max_gpus is None or gpus <= self.max_gpus)
                and (self.min_tokens is None or tokens >= self.min_tokens)
                and (self.max_tokens is None or tokens <= self.max_tokens)
                and (self.p2p is None or p2p == self.p2p)
                and (self.nccl is None or nccl == self.nccl))


# Engine parameters calibrate may fit; all are positive scalars with physical units. A fitted
# name is a field (`mem_eff`), an entry of a per-type/per-op table (`quant_mem_eff.iq`,
# `kernels.delta_net`), or a field for one GPU generation only (`hopper.gemm_eff`).
FITTABLE = ("launch_us", "graph_launch_us", "stream_us", "host_us", "segment_us", "forward_us", "mem_eff", "gemm_eff",
            "float_gemm_eff", "gemm_m0",
            "gemm_tile0", "gemm_k0", "attn_pp_eff", "attn_tg_eff", "attn_tg_h0", "recurrent_eff", "recurrent_h0",
            "recurrent_step_us", "comm_bw_eff", "copy_bw_eff", "copy_us", "allreduce_us", "mmid_route_us",
            "mmid_slot_us", "clock_eff", "mask_ns")
TABLES = ("quant_mem_eff", "quant_gemm_eff", "kernels", "decode_kernels", "gemv_ops", "gemv_us", "attn_tg_kv_eff")  # per storage type or family / per op
RATIOS = {"mem_eff", "gemm_eff", "float_gemm_eff", "copy_bw_eff", "attn_pp_eff", "attn_tg_eff", "recurrent_eff",
          "comm_bw_eff"}


def known_param(name: str) -> bool:
    head, _, rest = name.partition(".")
    if not rest:
        return name in FITTABLE
    if head in TABLES:
        return bool(rest)
    return head.isidentifier() and known_param(rest) and "." not in rest


class Engine(BaseModel):
    model_config = _Strict
    name: str
    description: str = ""
    cuda_graphs: Literal["never", "tg", "always"] = "tg"  # when kernels replay from a CUDA graph
    launch_us: float = Field(gt=0)  # per kernel, launched one by one
    graph_launch_us: float = Field(gt=0)  # per kernel, replayed from a CUDA graph
    # a mat-vec streaming weights reaches full bandwidth only after the memory pipeline fills and
    # ends with a partial wave: a fixed latency per weight-reading kernel on top of its bytes
    stream_us: float = Field(default=0.0, ge=0)
    # the same by weight type or family where it differs (a float mat-vec that first converts
    # its activations and calls a library kernel pays two launches): replaces stream_us
    gemv_us: dict[str, float] = {}
    # host time per graph node executed eagerly, from ONE host thread for every device (a
    # Python executor's interpreter + its torch calls and launches; views and leaves count
    # too); a device cannot run a kernel before it is issued, so a phase of many short
    # kernels on several GPUs is bounded by the host. 0: not modelled
    host_us: float = Field(default=0.0, ge=0)
    # graph passes the engine runs on the placed graph before executing it (graphir-cuda: the
    # fusions `graphir run` applies): predictions price that graph, so launches and host nodes
    # are the executed ones
    passes: list[str] = []
    forward_us: float = Field(ge=0)  # host work per forward pass (graph build, inputs, sampling)
    mem_eff: float = Field(gt=0, le=1)  # fraction of DRAM peak reached by streaming kernels
    quant_mem_eff: dict[str, float] = {}  # per storage type multiplier on mem_eff (dequant cost)
    quant_gemm_eff: dict[str, float] = {}  # per storage type multiplier on gemm_eff (unpacking cost)
    mmv_max_tokens: int = 8  # up to this many tokens a matmul is a streaming mat-vec
    # a mat-vec's decoding work per weight (unpacking, scaling, the dot product) in units of one
    # fp32 operation, by storage type or family: on a GPU with much bandwidth per FLOP (a
    # Hopper part) a 4-bit mat-vec is bound by this, not by the bytes. Measured from the
    # engine's own kernels (docs/cost_model.md); types absent: 4 (never the limit)
    gemv_ops: dict[str, float] = {}
    # the type the engine keeps activations in between kernels (the graph it prices is built
    # with it, as the executor builds its own): ggml computes in f32, graphir's executor in its
    # compute type (`--dtype`, bf16 by default). It sets the bytes of every norm, add, rope,
    # swiglu and activation copy, which dominate prefill outside the matmuls
    act_dtype: Literal["f32", "bf16", "f16"] = "f32"
    quant_rate: str = "int8"  # unit running GEMMs on quantised weights
    quant_dequant: bool = False  # GEMMs first expand quantised weights to f16 (extra bytes)
    float_rates: dict[str, str] = {"f32": "fp32", "f16": "fp16_acc16", "bf16": "bf16"}
    gemm_eff: float = Field(gt=0, le=1)  # fraction of peak for large GEMMs (quantised weights)
    float_gemm_eff: float | None = Field(default=None, gt=0, le=1)  # the same for f16/bf16/f32 weights
    gemm_m0: float = Field(gt=0)  # tokens per matmul at which GEMM efficiency halves
    gemm_tile0: float = Field(gt=0)  # rows (and inner size, without gemm_k0) at which GEMM efficiency halves
    # inner size at which GEMM efficiency halves: a tile's fixed work (loading its activations,
    # writing its output) is amortised over the blocks of the inner loop, so a short K (an
    # expert's down projection split over GPUs: K = 256) runs at a fraction of the rate
    gemm_k0: float | None = Field(default=None, gt=0)
    # MoE expert matmuls on quantised weights as ik's MMQ-id kernel runs them (mmid.py): the
    # token tile width (0: priced as a dense GEMM over each expert's tokens instead), the
    # routing pass per step and the cost of each tile slot of its grid; measured on the kernel
    mmid_tile: int = Field(default=0, ge=0)
    mmid_route_us: float = Field(default=0.0, ge=0)
    mmid_slot_us: float = Field(default=0.0, ge=0)
    # the kernel's padded tiles run at this fraction of the dense MMQ rate (they gather their
    # rows by expert and scatter the results); fitted with the two above
    mmid_eff: float = Field(default=1.0, gt=0, le=1)
    attn_pp_rate: str = "fp16_acc16"
    attn_pp_eff: float = Field(gt=0, le=1)
    attn_tg_rate: str = "fp32"
    attn_tg_eff: float = Field(gt=0, le=1)
    attn_tg_h0: float = Field(default=1.0, gt=0)  # q heads per GPU at which decode attention halves
    attn_tg_kv_eff: dict[str, float] = {}  # decode attention's rate by KV cache type, relative to f16
    recurrent_rate: str = "fp32"
    recurrent_eff: float = Field(gt=0, le=1)
    recurrent_h0: float = Field(default=0.0, ge=0)  # value heads per GPU at which the recurrent kernel halves
    # a recurrent kernel walks the tokens of a u-batch in order: each step waits for the last
    # (a dependent chain of small reductions), so T tokens take at least T steps of this latency
    recurrent_step_us: float = Field(default=0.0, ge=0)
    comm_bw_eff: float = Field(gt=0, le=1)  # fraction of a P2P link's rate the engine's transfers reach
    copy_us: float = Field(ge=0)  # engine cost per cross-device copy (events, split boundary)
    # the rate of those copies over the bus rate: an engine whose scheduler copies a tensor
    # between devices through host memory with a host-synchronous copy (ggml's backend
    # scheduler) reaches the same fraction of the bus with or without P2P, and less than its
    # reduce kernels do. None: the link's rate x comm_bw_eff
    copy_bw_eff: float | None = Field(default=None, gt=0, le=1)
    staged_copy: Literal["serial", "pipelined"] = "pipelined"  # copies through host without P2P
    allreduce_us: float = Field(ge=0)  # engine cost per all-reduce (kernels, host sync)
    allreduce: tuple[ARRule, ...] = (ARRule(algo="ring"),)
    reduce_f16_min_tokens: int = 33  # partials travel as f16 from this many tokens, else f32
    reduce_type: Literal["f16", "bf16", "f32", "q8_0"] = "f16"  # the type of those partials (-grt)
    nccl: bool = True  # the engine was built with NCCL and uses it where its rules say
    # host time per device segment (a split of the graph between synchronisation points) when
    # one host thread schedules every GPU: the split's graph launch and its events. 0: none
    segment_us: float = Field(default=0.0, ge=0)
    async_scheduler: bool = False  # one host thread per GPU (-sas): segments issue in parallel
    # flash attention (-fa); without it attention is a KQ mat-mul, a softmax and a KQV mat-mul
    # with the f32 scores written and read back in between
    flash_attn: bool = True
    # the SM clock the engine's tensor-core kernels hold through a sustained prefill, over the
    # datasheet's; None: the GPU's `tensor_clock_eff` (a large torch matmul's). An engine whose
    # kernels were timed for seconds at full clock sets 1 for that generation
    clock_eff: float | None = Field(default=None, gt=0, le=1.5)
    # host time per KQ-mask element the engine builds before each forward pass (ns, one host
    # thread): llama.cpp-style engines fill an n_kv x tokens mask on the CPU, cell by cell, and
    # upload it; from `mask_min_tokens` tokens and `mask_min_kv` cells `mask_threads` threads
    # share it. 0: not modelled
    mask_ns: float = Field(default=0.0, ge=0)
    mask_threads: int = Field(default=1, ge=1)
    mask_min_tokens: int = 32
    mask_min_kv: int = 1024
    kv_pad: int = Field(default=256, ge=1)  # the cache rows the engine's attention sees are padded to this
    # kernels the engine launches for one IR node of an op (its fused or unfused pieces), where
    # that differs from the op table's one; counted in the engine's graph builders
    kernels: dict[str, float] = {}
    # the same for a decode step only, where the engine's decode step fuses more than its
    # prefill (graphir-cuda: a residual add inside the next norm, routing weights inside top-k)
    decode_kernels: dict[str, float] = {}
    # the same fields for one GPU generation (`hopper: {gemm_eff: 0.3}`): that generation's
    # kernels reach other fractions of the peaks (another instruction set, other tile sizes)
    arch: dict[str, dict[str, float]] = {}
    fit: tuple[str, ...] = ()  # parameters `graphir calibrate` fits by default
    bounds: dict[str, tuple[float, float]] = {}  # physically plausible range per fitted parameter
    priors: dict[str, float] = {}  # physically expected values a fit is pulled towards (weakly)
    calibration: dict[str, Any] | None = None  # provenance of fitted values

    @field_validator("fit")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [p for p in v if not known_param(p)]
        if bad:
            raise ValueError(f"cannot fit {', '.join(bad)}; fittable: {', '.join(FITTABLE)} "
                             f"(or TABLE.key for {', '.join(TABLES)}, or ARCH.field)")
        return v

    @field_validator("arch")
    @classmethod
    def _arch_fields(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for a, fields in v.items():
            bad = [f for f in fields if f not in FITTABLE]
            if bad:
                raise ValueError(f"{a}: not a per-generation field: {', '.join(bad)}")
        return v

    def run_gpu(self, gpu: GPU) -> GPU:
        """`gpu` with the sustained clock this engine's kernels hold on it (`clock_eff`)."""
        clock = self.for_gpu(gpu).clock_eff
        return gpu if clock is None else gpu.model_copy(update={"tensor_clock_eff": clock})

    def ar_algo(self, gpus: int, tokens: int, p2p: bool) -> str:
        for r in self.allreduce:
            if r.applies(gpus, tokens, p2p, self.nccl):
                return r.algo
        return "ring"

    def for_gpu(self, gpu: GPU) -> "Engine":
        """The engine as it runs on `gpu`: its generation's fields replace the defaults."""
        over = self.arch.get(gpu.arch)
        return self.model_copy(update=over) if over else self

    def param(self, name: str) -> float:
        """A fittable parameter's value (`gemm_eff`, `kernels.delta_net`, `hopper.gemm_eff`)."""
        head, _, rest = name.partition(".")
        if not rest:
            v = getattr(self, name)
            return float(v if v is not None else 0.0)
        if head in TABLES:
            table = getattr(self, head)
            return float(table.get(rest, 1.0))
        return float(self.arch.get(head, {}).get(rest, self.param(rest)))

    def with_params(self, **values: float) -> "Engine":
        plain = {k: v for k, v in values.items() if "." not in k}
        out = self.model_copy(update=plain)
        for k, v in values.items():
            head, _, rest = k.partition(".")
            if not rest:
                continue
            if head in TABLES:
                out = out.model_copy(update={head: {**getattr(out, head), rest: v}})
            else:
                out = out.model_copy(update={"arch": {**out.arch, head: {**out.arch.get(head, {}), rest: v}}})
        return out


@lru_cache(maxsize=None)
def family(type_name: str) -> str:
    """The kernel family of a storage type (graphir.dtypes): the decoder a kernel runs for it."""
    return dtype(type_name).family


def by_type(table: dict[str, float], type_name: str, default: float = 1.0) -> float:
    """A per-type table entry of an engine: the type itself, else its family, else `default`."""
    if not type_name:
        return default
    return table.get(type_name, table.get(family(type_name), default))


# ----------------------------------------------------------------------------- loading

def _data(name: str) -> dict[str, Any]:
    return data(name, "backends.costmodel")


def engine_names() -> list[str]:
    root = resources.files("backends.costmodel") / "data"
    return sorted(p.name[len("engine_"):-5] for p in root.iterdir()
                  if p.name.startswith("engine_") and p.name.endswith(".yaml"))


def load_engine(spec: str | Path) -> Engine:
    """`--engine`: a shipped engine name (`ik_llama.cpp`, `graphir-cuda`) or a YAML file."""
    p = Path(spec)
    if str(spec) in engine_names():
        return validate(Engine, _data(f"engine_{spec}.yaml"), f"engine {spec}")
    if p.is_file():
        return validate(Engine, read_yaml(p.read_text(encoding="utf-8"), str(p)), str(p))
    raise ProfileError(f"unknown engine {str(spec)!r}: not a file, and engines are {', '.join(engine_names())}")


def engine_yaml(e: Engine) -> str:
    """The engine as YAML, fields in declaration order (diff-friendly, reloads equal)."""
    return yaml.safe_dump(e.model_dump(mode="json", exclude_none=True), sort_keys=False, width=100,
                          default_flow_style=None)
