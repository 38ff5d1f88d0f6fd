"""ik_llama.cpp's MoE expert matmul on quantised weights (ggml MUL_MAT_ID, its MMQ-id kernel).

A dense GEMM over the tokens each expert gets (m = T·k/U, ~10-40 tokens) is the wrong shape for
this kernel. What it does, read from ik's CUDA source (facts only) and timed by
bench/peer_ops.cpp on one H200 (docs/results/h200_2026-12-03/ik_ops.csv):

1. A routing pass (`mmq_ids_helper`): one warp per expert walks the batch's tokens in order to
   collect that expert's rows; its length is T steps, or T·k/32 where the kernel has a version
   for k (2, 4, 8, 16, 32; 6 runs as 8; any other k, e.g. Qwen3-Next's 10, one token a step).
   Fitted: `mmid_route_us` per step. ik's fused up/gate routes once for both matrices (an expert matmul that reads the
   same activations and routing as an earlier one pays no routing, `Priced.moe[3]`).
2. A stream-k grid over every expert × row tile × token tile: E · ⌈n/128⌉ · ⌈T/x⌉ tile slots,
   where x is the token tile (the kernel picks it from all T tokens, as any expert might get all
   of them: 128 from 128 tokens on). Empty slots still cost their bookkeeping: `mmid_slot_us` each.
3. The tiles that hold tokens run at the large-GEMM MMQ rate of the engine (no new rate), each
   expert's tokens padded to whole tiles of x: Σ_e x·⌈X_e/x⌉ token columns, X_e ~ Binomial(T, k/E).
4. The weights of the experts touched, E·(1-(1-k/E)^T) of them, are read at the streaming rate
   while the tiles compute (the longer of the two counts).

Two parameters are fitted, to the kernel rows only (`fit_rows`); the tile width is the kernel's.
Between multiples of 128 tokens the kernel may pick a narrower tile than `tile_width` says: the
model then over-counts the padding (an upper bound), which keeps it monotone in T.
"""

from __future__ import annotations

import csv
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from backends.costmodel.profiles import Engine, by_type
from backends.costmodel.rules import distinct_experts
from graphir.dtypes import dtype
from hardware.profiles import GPU

if TYPE_CHECKING:
    from backends.costmodel.price import Priced

ROW_TILE = 128  # mmq_y of the MMQ kernels on Volta and later: output rows per tile
_TEMPLATED_K = (2, 4, 8, 16, 32)  # routing passes specialised for these k (6 runs as 8)


def tile_width(tokens: int, tile: int) -> int:
    """Token columns per tile: the batch rounded up to 8 below `tile`, else `tile`."""
    return min(tile, 8 * math.ceil(max(tokens, 1) / 8))


def route_steps(tokens: int, used: int) -> float:
    """Serial steps of the routing pass over a batch of `tokens` tokens, `used` experts each."""
    kp = 8 if used == 6 else used  # tokens per step: 32 lanes over k padded to a power of two
    return float(tokens) * kp / 32.0 if kp in _TEMPLATED_K else float(tokens)


@lru_cache(maxsize=4096)
def padded_columns(tokens: int, experts: int, used: int, x: int) -> float:
    """Expected Σ_e x·⌈X_e/x⌉ over `experts` experts, X_e ~ Binomial(tokens, used/experts): the
    token columns the tiles compute, each touched expert's tokens padded to whole tiles."""
    if experts <= 0 or used <= 0:
        return 0.0
    p = min(used / experts, 1.0)
    if p >= 1.0:
        return experts * x * math.ceil(tokens / x)
    i = np.arange(tokens + 1, dtype=float)
    # log pmf by the ratio p(i+1)/p(i) = (T-i)/(i+1) · p/(1-p), summed from p(0) = (1-p)^T
    steps = np.log(np.maximum(tokens - i[:-1], 1e-300)) - np.log(i[:-1] + 1) + math.log(p) - math.log1p(-p)
    logp = np.concatenate([[tokens * math.log1p(-p)], tokens * math.log1p(-p) + np.cumsum(steps)])
    pmf = np.exp(logp)  # [T+1]
    return float(experts * x * (np.ceil(i / x) * pmf).sum())


class Expert(NamedTuple):
    """One MUL_MAT_ID: E experts of [rows, inner] weights of type `wtype`, T tokens, k each."""
    wtype: str
    rows: int
    inner: int
    tokens: int
    experts: int
    used: int
    shared: int = 0  # slots every token reads (a folded shared expert)
    routes: bool = True  # pays its own routing pass


def big_gemm_rate(gpu: GPU, eng: Engine, wtype: str) -> float:
    """FLOP/s of the engine's MMQ kernel on full tiles of type `wtype` (its large-GEMM rate)."""
    return gpu.rate(eng.quant_rate) * eng.gemm_eff * by_type(eng.quant_gemm_eff, wtype)


def touched(e: Expert) -> float:
    """Experts whose weights the kernel reads: the shared ones and the routed ones hit."""
    return e.shared + distinct_experts(e.experts - e.shared, e.used - e.shared, e.tokens)


def seconds(e: Expert, gpu: GPU, eng: Engine) -> tuple[float, float]:
    """(compute seconds, weight-read seconds) of one MUL_MAT_ID on `gpu` (engine as run there)."""
    x = tile_width(e.tokens, eng.mmid_tile)
    routed = e.experts - e.shared
    cols = padded_columns(e.tokens, routed, e.used - e.shared, x) + e.shared * x * math.ceil(e.tokens / x)
    slots = e.experts * math.ceil(e.rows / ROW_TILE) * math.ceil(e.tokens / x)
    steps = route_steps(e.tokens, e.used) if e.routes else 0.0
    t_c = (2.0 * cols * e.rows * e.inner / (big_gemm_rate(gpu, eng, e.wtype) * eng.mmid_eff)
           + (steps * eng.mmid_route_us + slots * eng.mmid_slot_us) * 1e-6)
    wbytes = touched(e) * e.rows * dtype(e.wtype).nbytes(e.inner)
    return t_c, wbytes / (gpu.mem_bw_GBps * 1e9 * eng.mem_eff)


def kernel_seconds(e: Expert, gpu: GPU, eng: Engine) -> float:
    """The kernel's time: tiles and weight reads overlap."""
    return max(seconds(e, gpu, eng))


def dense_seconds(e: Expert, gpu: GPU, eng: Engine) -> float:
    """What the dense-GEMM term (mmid_tile 0) gives the same kernel: T·k/U tokens per touched
    expert at the engine's GEMM shape efficiency, or the weight read. For comparison only."""
    U = touched(e)
    m, k0 = e.tokens * e.used / U, eng.gemm_k0 or eng.gemm_tile0
    shape = m / (m + eng.gemm_m0) * e.rows / (e.rows + eng.gemm_tile0) * e.inner / (e.inner + k0)
    flops = 2.0 * e.tokens * e.used * e.rows * e.inner
    return max(flops / (big_gemm_rate(gpu, eng, e.wtype) * shape), seconds(e, gpu, eng)[1])


# ---------------------------------------------------------------- the measured kernel table

class Row(NamedTuple):
    case: Expert
    us: float


def kernel_rows(path: Path, min_tokens: int = 9) -> list[Row]:
    """MUL_MAT_ID rows of quantised types with more than `mmv_max_tokens` tokens from a
    bench/peer_ops.cpp CSV (`m` rows per expert, `n` tokens, `k` inner, `extra` eNuK)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for r in csv.DictReader(line for line in f if not line.startswith("#")):
            if r["op"] != "MUL_MAT_ID" or not dtype(r["type"]).is_quant or int(r["n"]) < min_tokens:
                continue
            E, k = (int(v) for v in r["extra"][1:].split("u"))
            out.append(Row(Expert(dtype(r["type"]).name, int(r["m"]), int(r["k"]), int(r["n"]), E, k), float(r["us"])))
    return out


def fit_rows(rows: list[Row], gpu: GPU, eng: Engine) -> tuple[float, float, float]:
    """(mmid_route_us, mmid_slot_us, mmid_eff) minimising the relative error over `rows`: the
    padded tiles at the engine's dense MMQ rate over mmid_eff; where the tiles are shorter than
    the weight read, the fixed terms are fitted against that read instead (the kernel's max).
    Linear least squares in (route, slot, 1/eff), two passes."""
    free = eng.model_copy(update={"mmid_route_us": 0.0, "mmid_slot_us": 0.0, "mmid_eff": 1.0})
    route, slot, inv = 0.0, 0.0, 1.0
    for _ in range(2):
        A, b = [], []
        for row in rows:
            e = row.case
            t_c, t_m = seconds(e, gpu, free)
            x = tile_width(e.tokens, eng.mmid_tile)
            feats = [t_c * 1e6, route_steps(e.tokens, e.used) if e.routes else 0.0,
                     e.experts * math.ceil(e.rows / ROW_TILE) * math.ceil(e.tokens / x)]
            base = 0.0
            if t_m * 1e6 > feats[0] * inv + feats[1] * route + feats[2] * slot:
                feats, base = [0.0, 0.0, 0.0], t_m * 1e6  # weight-bound at the current values
            A.append([f / row.us for f in feats])
            b.append((row.us - base) / row.us)
        inv, route, slot = (float(v) for v in np.linalg.lstsq(np.array(A), np.array(b), rcond=None)[0])
    return route, slot, 1.0 / inv


# ---------------------------------------------------------------- a priced graph's expert matmuls

def nodes(pr: "Priced", eng: Engine) -> np.ndarray:
    """Which nodes of `pr` run as MMQ-id kernels: expert matmuls on quantised weights in a batch
    of more than `mmv_max_tokens` tokens (fewer: the mat-vec kernels), when the engine says so."""
    if not eng.mmid_tile or pr.phase == "tg" or pr.tokens <= eng.mmv_max_tokens:
        return np.zeros(len(pr.names), dtype=bool)
    quant = np.array([bool(w) and dtype(w).is_quant for w in pr.wdtype], dtype=bool)
    return (pr.moe[0] > 0) & quant


def compute_seconds(pr: "Priced", gpu: GPU, eng: Engine, mask: np.ndarray) -> np.ndarray:
    """[N] the tile and routing seconds of the `mask` nodes (0 elsewhere)."""
    out = np.zeros(len(pr.names))
    for i in np.flatnonzero(mask):
        e = Expert(pr.wdtype[i], int(pr.mnk[1][i]), int(pr.mnk[2][i]), pr.tokens, int(pr.moe[0][i]),
                   int(pr.moe[1][i]), int(pr.moe[2][i]), bool(pr.moe[3][i]))
        out[i] = seconds(e, gpu, eng)[0]
    return out

