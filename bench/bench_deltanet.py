"""Time the delta-net prefill kernels of one Qwen3-Next linear-attention layer on a GPU.

    python3 bench/bench_deltanet.py [--T 2048] [--nk 16] [--nv 32] [--dk 128] [--dv 128] [--iters 20]

Prints ms per call and the relative L2 error against the token-serial kernel for: the
token-serial kernel, the old chunked form (torch intra-chunk terms with the triangular solve,
exact f32 state kernel), the new default (fused intra-chunk kernel + tf32 state kernel), each
state-kernel tile of CONFIGS, and the two intra-chunk forms alone.
"""

from __future__ import annotations

# bench: needs a CUDA GPU  (`make bench` skips this script on a machine without one)

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

from backends.cuda.triton_kernels import deltanet_prefill  # noqa: E402
from backends.cuda.triton_kernels import deltanet as tdn  # noqa: E402
from backends.cuda.runtime.choices import KernelChoices  # noqa: E402
from backends.cuda.reference.recurrent import chunk_terms  # noqa: E402

CHOICES = KernelChoices()  # what this run of the benchmark measured, kept across its calls


def ms_per_call(fn: Callable[[], object], iters: int) -> float:
    """Median of `iters` timed calls after two warm-up calls (compiles outside the timing)."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--nk", type=int, default=16)
    ap.add_argument("--nv", type=int, default=32)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="q, k, v as the model hands them over")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_deltanet.py: skipped: needs a CUDA GPU")
        return 0
    if tdn.triton is None:
        print("bench_deltanet: Triton is not installed", file=sys.stderr)
        return 2
    dev = torch.device("cuda:0")
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k = (torch.randn(a.T, a.nk, a.dk, device=dev, generator=gen).to(dt) for _ in range(2))
    v = torch.randn(a.T, a.nv, a.dv, device=dev, generator=gen).to(dt)
    g = -torch.rand(a.T, a.nv, device=dev, generator=gen)
    beta = torch.rand(a.T, a.nv, device=dev, generator=gen)
    s = 0.1 * torch.randn(a.dk, a.nv, a.dv, device=dev, generator=gen)
    print(f"{torch.cuda.get_device_name(dev)}  T={a.T} nk={a.nk} nv={a.nv} dk={a.dk} dv={a.dv} {a.dtype}")

    ref = tdn.delta_net(q, k, v, g, beta, s)
    rows: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("recurrent (token-serial)", lambda: tdn.delta_net(q, k, v, g, beta, s)),
        ("old chunked (torch terms, ieee)",
         lambda: tdn.delta_net_chunked(q, k, v, g, beta, s, config=(32, 8, "ieee", 1), prep="torch")),
        ("new chunked (default)", lambda: tdn.delta_net_chunked(q, k, v, g, beta, s, choices=CHOICES)),
    ]
    for cfg in tdn.CONFIGS:
        rows.append((f"  fused terms + tile {cfg}",
                     lambda cfg=cfg: tdn.delta_net_chunked(q, k, v, g, beta, s, config=cfg, prep="fused")))
    for name, fn in rows:
        try:
            out = fn()
            t = ms_per_call(fn, a.iters)
        except Exception as e:  # a tile that does not compile on this GPU: say so and go on
            print(f"{name:48s} failed: {str(e).splitlines()[0][:120]}")
            continue
        err = float((out - ref).norm() / ref.norm())
        print(f"{name:48s} {t:8.3f} ms   rel L2 err {err:.2e}")
    for name, fn2 in (("  intra-chunk terms, torch", lambda: chunk_terms(q, k, v, g, beta, True, 64)),
                      ("  intra-chunk terms, fused tf32", lambda: tdn.chunk_terms_fused(q, k, v, g, beta)),
                      ("  intra-chunk terms, fused tf32, 4 warps",
                       lambda: tdn.chunk_terms_fused(q, k, v, g, beta, warps=4)),
                      ("  intra-chunk terms, fused ieee",
                       lambda: tdn.chunk_terms_fused(q, k, v, g, beta, precision="ieee"))):
        try:
            print(f"{name:48s} {ms_per_call(fn2, a.iters):8.3f} ms")
        except Exception as e:
            print(f"{name:48s} failed: {str(e).splitlines()[0][:120]}")
    print("calibrate() (ms):", deltanet_prefill.calibrate(dev, a.nk, a.nv, a.dk, a.dv, T=a.T, choices=CHOICES))
    print("chosen:", dict(CHOICES.deltanet_prefill))
    return 0


if __name__ == "__main__":
    sys.exit(main())
