"""Memory checks before a Session allocates anything: the bytes are known from the graph.

A Session holds every weight in the compute type (`--dtype`: quantised or bf16 files are
converted when they load), the KV cache at its context length, the recurrent state and the
live activations of one prefill call. `passes.memory.plan_memory` sums those per device on
the graph the session will run; this module compares the sums with what the machine has:
host memory (MemAvailable of /proc/meminfo, or psutil where installed) when the devices are
CPUs, which all share it, and each GPU's free memory (`torch.cuda.mem_get_info`) otherwise.
A model that does not fit is refused in a fraction of a second, with the numbers, instead of
allocating for a minute and dying. The estimate is a lower bound (allocator slack and the
loader's one-layer staging are not counted), so a refusal is never a false alarm.

Only `check_gpus` imports torch, so the host check runs before torch is even loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from graphir.ops import act_dtype
from graphir.quant import uniform
from passes.memory import MemoryPlan, enforce_fit, fit_problem, plan_memory

Pass = Callable[[Graph], Graph]
HINT = "use fewer --layers, a smaller --ctx or --dtype, or more devices"


def session_plan(cfg: ModelConfig, dtype: str, ctx: int, tokens: int, layers: range | None = None,
                 transform: Iterable[Pass] = (), pp_logits: str = "all", kv_type: str | None = None) -> MemoryPlan:
    """Memory per device of a Session's prefill graph: weights in the compute type (as the
    Session loads them), KV in `kv_type` (default: the compute type), `ctx` cached tokens,
    `tokens` in one prefill call."""
    act = act_dtype(dtype).name
    opts = BuildOptions(phase="pp", act_dtype=act, quant=uniform(act), kv_type=kv_type or act,  # type: ignore[arg-type]
                        logits=pp_logits)  # type: ignore[arg-type]
    g = build(cfg, opts, layers)
    for p in transform:
        g = p(g)
    return plan_memory(g, ctx, tokens)


def per_device(plan: MemoryPlan, default: str) -> dict[str, int]:
    """Bytes per device name (an unplaced graph's '-' is the session's first device)."""
    return {default if d.device == "-" else d.device: d.total for d in plan.devices}


def host_available(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """Bytes the kernel says can be allocated without swapping, or None where unknown."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-not-found, import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _what(plan: MemoryPlan, dtype: str) -> str:
    gib = 1 << 30
    w = sum(d.weights for d in plan.devices) / gib
    kv = sum(d.kv + d.state for d in plan.devices) / gib
    c = sum(d.compute for d in plan.devices) / gib
    return (f"weights {w:.2f} GiB in {dtype}, KV and state {kv:.2f} GiB at ctx {plan.ctx}, "
            f"activations {c:.2f} GiB for {plan.ubatch} tokens")


def check_host(plan: MemoryPlan, dtype: str, allow_overflow: bool = False) -> str | None:
    """CPU devices (logical ones share the one memory): the plan's total against MemAvailable."""
    have = host_available()
    if have is None:
        return None
    need = sum(d.total for d in plan.devices)
    problem = fit_problem({"host": need}, {"host": have}, f"host memory, {_what(plan, dtype)}")
    return enforce_fit(problem, allow_overflow, HINT)


def check_gpus(plan: MemoryPlan, devices: Sequence[str], dtype: str, allow_overflow: bool = False) -> str | None:
    """Each GPU's share of the plan against its free memory now."""
    import torch

    need = {d: b for d, b in per_device(plan, devices[0]).items() if d.startswith("cuda")}
    if not need or not torch.cuda.is_available():
        return None
    have = {d: torch.cuda.mem_get_info(torch.device(d))[0] for d in need}
    problem = fit_problem(need, have, f"free GPU memory, {_what(plan, dtype)}")
    return enforce_fit(problem, allow_overflow, HINT)


def check(plan: MemoryPlan, devices: Sequence[str], dtype: str, allow_overflow: bool = False) -> str | None:
    """The host check for CPU devices, the GPU check for CUDA ones; the warning when allowed."""
    if all(d.startswith("cpu") for d in devices):
        return check_host(plan, dtype, allow_overflow)
    return check_gpus(plan, devices, dtype, allow_overflow)


def gib_per_device(plan: MemoryPlan, default: str) -> Mapping[str, float]:
    return {d: round(b / (1 << 30), 6) for d, b in per_device(plan, default).items()}
