"""Time the quant GEMV (backends/cuda/quant) on Qwen3-8B's decode shapes against bf16 and a copy.

    python3 bench/bench_quant_gemv.py [--types Q8_0,Q4_0,Q4_1,Q5_0,Q4_K,Q5_K,Q6_K] [--reps 30] [--default-only]

For each quant type and [N, K] (attention out 4096x4096, merged qkv 6144x4096, merged up+gate
24576x4096, down 4096x12288, output head 151936x4096) it times, with CUDA events and L2 flushed
before every call (a decode step reads each weight once): the Triton GEMV on the repacked blocks
(the fastest of its tile configs, as `choose` picks it), cuBLAS's bf16 GEMV (F.linear) on the
dequantised weight, and a device copy of the quant's bytes. It prints one row per case: us,
GB/s on the bytes the kernel reads (quants + scales: the file's bytes; for Q4_K 148 per 256
weights and Q5_K 180, their 6-bit scales unpacked to bytes), that as a % of the copy's bandwidth (bytes
read + written per second, for the same bytes and for a 2 GiB copy) and the speed-up over bf16.
The weights are random blocks (timing does not depend on the values); it writes no files.
"""

from __future__ import annotations

# bench: needs a CUDA GPU  (`make bench` skips this script on a machine without one)

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

from backends.cuda.quant import formats, gemv, repack  # noqa: E402

SHAPES = ((4096, 4096), (6144, 4096), (24576, 4096), (4096, 12288), (151936, 4096))  # Qwen3-8B [N, K]
F16_FIELDS = {"Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets; (0,) for the rest


def random_packed(qtype: str, n: int, k: int, dev: torch.device) -> repack.Packed:
    """Random blocks with finite scales (the f16 scale fields of each block overwritten)."""
    bs, size = formats.SIZES[qtype]
    raw = torch.randint(0, 256, (n, k // bs, size), dtype=torch.uint8, device=dev)
    d = (torch.rand(n, k // bs, device=dev) * 1e-2 + 1e-3).half()
    for off in F16_FIELDS.get(qtype, (0,)):  # d, and the min's scale where there is one
        raw[..., off:off + 2] = d.view(torch.uint8).reshape(n, k // bs, 2)
    return repack.repack(raw.reshape(n, -1), qtype)


def copy_ms(nbytes: int, dev: torch.device, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return gemv.gpu_time(lambda: dst.copy_(src), dev, reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(repack.WORDS), help="comma-separated quant types with a repacked layout")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per kernel (the median is kept)")
    ap.add_argument("--default-only", action="store_true", help="time only the default tile (no config search)")
    ap.add_argument("--search-budget", type=float, default=40.0,
                    help="seconds after which the remaining cases time only the default tile (each config "
                         "is a Triton compile the first time: this keeps a cold run under a minute)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_quant_gemv.py: skipped: needs a CUDA GPU")
        return 0
    if gemv.triton is None:
        print("bench_quant_gemv.py: Triton is not installed", file=sys.stderr)
        return 1
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    bad = [t for t in types if t not in repack.WORDS]
    if bad:
        print(f"bench_quant_gemv.py: no repacked layout for {', '.join(bad)} (have {', '.join(repack.WORDS)})",
              file=sys.stderr)
        return 1
    dev = torch.device("cuda:0")
    t0 = time.perf_counter()
    big = 2 << 30
    big_gbs = 2 * big / copy_ms(big, dev, a.reps) / 1e6  # read + write, GB/s
    print(f"# {torch.cuda.get_device_name(dev)}; 2 GiB device copy: {big_gbs:.0f} GB/s (read + write)")
    print(f"{'type':6} {'N x K':>13} {'us':>8} {'GB/s':>7} {'%copy':>6} {'%2GiB':>6} {'bf16 us':>8} "
          f"{'x bf16':>6} {'copy us':>8}  config")
    for qtype in types:
        for n, k in SHAPES:
            p = random_packed(qtype, n, k, dev)
            x = torch.randn(1, k, device=dev).to(torch.bfloat16)
            if a.default_only or time.perf_counter() - t0 > a.search_budget:
                cfg, ms = gemv.DEFAULT, gemv.gpu_time(lambda: gemv.gemv(x, p), dev, a.reps)
            else:
                cfg, _ = gemv.choose(x, p)
                ms = gemv.gpu_time(lambda: gemv.gemv(x, p, cfg), dev, a.reps)
            w16 = repack.dequantize(p).to(torch.bfloat16)
            err = float((gemv.gemv(x, p, cfg).float() - F.linear(x, w16).float()).abs().max())
            bf16_ms = gemv.gpu_time(lambda: F.linear(x, w16), dev, a.reps)
            del w16
            c_ms = copy_ms(p.nbytes, dev, a.reps)
            gbs = p.nbytes / ms / 1e6
            print(f"{qtype:6} {n:>6}x{k:<6} {ms * 1e3:8.1f} {gbs:7.0f} {100 * gbs / (2 * p.nbytes / c_ms / 1e6):6.1f} "
                  f"{100 * gbs / big_gbs:6.1f} {bf16_ms * 1e3:8.1f} {bf16_ms / ms:6.2f} {c_ms * 1e3:8.1f}  "
                  f"{','.join(map(str, cfg))} (max |diff| vs bf16 {err:.2g})", flush=True)
            del p, x
            torch.cuda.empty_cache()
    print(f"# {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
