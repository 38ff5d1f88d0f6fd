"""Microseconds per call of the MoE fast paths, before and after the fast_moe.py rework.

    python3 bench/bench_moe.py [--iters 100] [--no-sweep]

Shapes of Qwen3-Next-80B-A3B (E=512 experts, top-10, H=2048, moe_intermediate I=512, bf16):
  decode (T=1)   router top-k, routing weights, moe_sum, the expert GEMV (gate_up merged:
                 [E,2I,H], and down: [E,H,I]), plus a sweep of the GEMV's (BN, BK, warps)
  prefill (T=2048)  one layer's two grouped matmuls (routing once vs per matmul), its parts
                 (sort, row gather, unsort), top-k and moe_sum
"old" is the code this rework replaced, kept here as the baseline. Decode rows time a CUDA
graph of `iters` calls (what a captured decode step pays: GPU time, no launch overhead);
prefill rows time eager calls with CUDA events. GEMV calls cycle through 16 sets of random
experts so that the 10 experts' weights are not served from L2.
"""

from __future__ import annotations

# bench: needs a CUDA GPU  (`make bench` skips this script on a machine without one)

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backends.cuda.runtime.choices import KernelChoices  # noqa: E402
from backends.cuda.triton_kernels.fused import tl, triton  # noqa: E402

DEV = "cuda:0"
E, K_TOP, H, I = 512, 10, 2048, 512
T_PREFILL = 2048
CHOICES = KernelChoices()  # what this run of the benchmark measured, kept across its calls


def gpu_us(fn: Callable[[], object], iters: int, graph: bool) -> float:
    """Mean GPU microseconds per call of fn."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        g.replay()
        torch.cuda.synchronize()
        start.record()
        g.replay()
        end.record()
    else:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def row(name: str, old: float | None, new: float, extra: str = "") -> None:
    o = f"{old:9.1f}" if old is not None else " " * 9
    speed = f"{old / new:5.2f}x" if old is not None else " " * 6
    print(f"  {name:<34} {o} {new:9.1f} {speed}  {extra}")


# ---- the replaced code (baseline) ----------------------------------------------------------------

def old_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(logits, k, dim=-1).indices.to(torch.int32)


def old_weights(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.gather(1, ids.long()).to(torch.float32), dim=-1)


def old_sum(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.bmm(w.to(y.dtype).unsqueeze(1), y).squeeze(1)


def old_grouped(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    T, k = ids.shape
    n_exp, N, K = w.shape
    flat = ids.reshape(-1).long()
    sorted_ids, order = torch.sort(flat)
    src = order if x.dim() == 3 else torch.div(order, k, rounding_mode="floor")
    xs = (x.reshape(T * k, K) if x.dim() == 3 else x).index_select(0, src).to(w.dtype)
    ends = torch.searchsorted(sorted_ids, torch.arange(n_exp, device=ids.device), right=True)
    ys = torch._grouped_mm(xs, w.transpose(1, 2), offs=ends.to(torch.int32))
    out = torch.empty_like(ys)
    out.index_copy_(0, order, ys)
    return out.view(T, k, N).to(x.dtype)


if triton is not None:

    @triton.jit
    def _old_gemv_k(x_ptr, w_ptr, ids_ptr, o_ptr, N, K, NKB, KSLOT, sx, PER_SLOT: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
        # the replaced GEMV: a cross-lane reduction every step, masked loads
        s = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(ids_ptr + s).to(tl.int64)
        row = s if PER_SLOT else s // KSLOT
        offs_n = nb * BN + tl.arange(0, BN)
        mn = offs_n < N
        acc = tl.zeros([BN], dtype=tl.float32)
        wbase = w_ptr + e * N * K
        for kb in range(0, NKB):
            offs_k = kb * BK + tl.arange(0, BK)
            mk = offs_k < K
            xv = tl.load(x_ptr + row * sx + offs_k, mask=mk, other=0.0).to(tl.float32)
            wv = tl.load(wbase + offs_n[:, None] * K + offs_k[None, :], mask=mn[:, None] & mk[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        tl.store(o_ptr + s * N + offs_n, acc.to(o_ptr.dtype.element_ty), mask=mn)


def old_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    T, k = ids.shape
    _, N, K = w.shape
    per_slot = x.dim() == 3
    xs = x.reshape(T * k, K) if per_slot else x
    out = torch.empty((T * k, N), dtype=x.dtype, device=x.device)
    BK = min(256, max(16, triton.next_power_of_2(K)))
    _old_gemv_k[(T * k, triton.cdiv(N, 16))](xs, w, ids, out, N, K, triton.cdiv(K, BK), k, xs.stride(0),
                                             PER_SLOT=per_slot, BN=16, BK=BK, num_warps=4)
    return out.view(T, k, N)


# ---- measurements ------------------------------------------------------------------------------

def rand_ids(T: int, sets: int, dev: torch.device) -> list[torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(0)
    return [torch.topk(torch.rand(T, E, device=dev, generator=g), K_TOP).indices.to(torch.int32)
            for _ in range(sets)]


def decode(iters: int, sweep: bool) -> None:
    from backends.cuda.triton_kernels import fast_moe, moe_router

    dev = torch.device(DEV)
    bf = torch.bfloat16
    print(f"decode T=1 (CUDA graph of {iters} calls)          old us    new us  speedup")
    logits = torch.randn(1, E, device=dev, dtype=bf)
    ids = old_topk(logits, K_TOP)
    t_topk = gpu_us(lambda: old_topk(logits, K_TOP), iters, True)
    t_w = gpu_us(lambda: old_weights(logits, ids), iters, True)
    t_new = gpu_us(lambda: moe_router.topk_softmax(logits, K_TOP, choices=CHOICES), iters, True)
    row("router top-k", t_topk, t_new, "(new: ids and norm weights in one launch)")
    row("routing weights (norm)", t_w, gpu_us(lambda: moe_router.selected_softmax(logits, ids), iters, True),
        "(new: only when top-k's weights are not at hand)")
    row("top-k + weights", t_topk + t_w, t_new)
    new_ids, new_w = moe_router.topk_softmax(logits, K_TOP, choices=CHOICES)
    assert torch.equal(new_ids, ids), "top-k differs from torch.topk"
    y = torch.randn(1, K_TOP, H, device=dev, dtype=bf)
    wts = torch.rand(1, K_TOP, device=dev)
    row("moe_sum [1,10,2048]", gpu_us(lambda: old_sum(y, wts), iters, True),
        gpu_us(lambda: moe_router.moe_sum(y, wts), iters, True))

    sets = rand_ids(1, 16, dev)
    shapes = {"gemv gate_up [E,1024,2048]": (torch.randn(1, H, device=dev, dtype=bf), (E, 2 * I, H)),
              "gemv down [E,2048,512]": (torch.randn(1, K_TOP, I, device=dev, dtype=bf), (E, H, I))}
    for name, (x, (ne, N, K)) in shapes.items():
        w = torch.randn(ne, N, K, device=dev, dtype=bf) * 0.02
        mb = K_TOP * N * K * 2 / 1e6
        state = {"i": 0}

        def call(fn: Callable, *extra: object) -> Callable[[], object]:
            def f() -> object:
                state["i"] = (state["i"] + 1) % len(sets)
                return fn(x, w, sets[state["i"]], *extra)
            return f

        t_old = gpu_us(call(old_gemv), iters, True)
        t_new = gpu_us(call(fast_moe.moe_gemv, None, None, CHOICES), iters, True)
        row(name, t_old, t_new, f"{mb:.0f} MB: {mb / t_new:.2f} TB/s new, config {fast_moe.gemv_config(N, K)}")
        ref = old_gemv(x, w, sets[0]).float()
        err = float((fast_moe.moe_gemv(x, w, sets[0], choices=CHOICES).float() - ref).abs().max() / ref.abs().max())
        assert err < 2e-2, f"gemv differs from the old kernel: {err}"
        if sweep:
            got = []
            for bn in (8, 16, 32, 64):
                for bk in (64, 128, 256, 512, 1024):
                    for warps in (2, 4, 8):
                        if bk > K or bn * bk > 32768 or bn * bk < 32 * warps:
                            continue
                        got.append((gpu_us(call(fast_moe.moe_gemv, (bn, bk, warps)), iters, True), (bn, bk, warps)))
            got.sort()
            print("      best (BN,BK,warps): " + ", ".join(f"{c} {t:.1f}us" for t, c in got[:6]))
        del w
    torch.cuda.empty_cache()


def prefill(iters: int) -> None:
    from backends.cuda.triton_kernels import fast_moe, moe_router

    dev = torch.device(DEV)
    bf = torch.bfloat16
    T = T_PREFILL
    print(f"\nprefill T={T} (eager, {iters} calls)                old us    new us  speedup")
    x = torch.randn(T, H, device=dev, dtype=bf)
    w_gu = torch.randn(E, 2 * I, H, device=dev, dtype=bf) * 0.02
    w_dn = torch.randn(E, H, I, device=dev, dtype=bf) * 0.02
    logits = torch.randn(T, E, device=dev, dtype=bf)
    ids = old_topk(logits, K_TOP)
    h = torch.randn(T, K_TOP, I, device=dev, dtype=bf)
    if not fast_moe._grouped_mm_ok(x, w_gu):
        print("  torch._grouped_mm unavailable here (needs Hopper and a recent torch): prefill skipped")
        return

    def old_layer() -> None:
        old_grouped(x, w_gu, ids)
        old_grouped(h, w_dn, ids)

    def new_layer() -> None:
        r = fast_moe.route(ids, E)
        fast_moe.moe_grouped(x, w_gu, ids, r, CHOICES)
        fast_moe.moe_grouped(h, w_dn, ids, r, CHOICES)

    row("layer: gate_up + down", gpu_us(old_layer, iters, False), gpu_us(new_layer, iters, False))
    r = fast_moe.route(ids, E)
    row("gate_up alone (route shared)", gpu_us(lambda: old_grouped(x, w_gu, ids), iters, False),
        gpu_us(lambda: fast_moe.moe_grouped(x, w_gu, ids, r, CHOICES), iters, False))
    row("down alone (route shared)", gpu_us(lambda: old_grouped(h, w_dn, ids), iters, False),
        gpu_us(lambda: fast_moe.moe_grouped(h, w_dn, ids, r, CHOICES), iters, False))
    for name, a, b in (("gate_up", old_grouped(x, w_gu, ids), fast_moe.moe_grouped(x, w_gu, ids, r, CHOICES)),
                       ("down", old_grouped(h, w_dn, ids), fast_moe.moe_grouped(h, w_dn, ids, r, CHOICES))):
        err = float((a.float() - b.float()).abs().max() / a.float().abs().max())
        assert err < 1e-2, f"prefill {name} differs from the old path: {err}"

    flat = ids.reshape(-1)
    row("sort: i64 keys (old) / route (new)", gpu_us(lambda: torch.sort(flat.long()), iters, False),
        gpu_us(lambda: fast_moe.route(ids, E), iters, False), "(new: i16 keys + searchsorted)")
    ys = torch.randn(T * K_TOP, 2 * I, device=dev, dtype=bf)
    order = r.order

    def old_unsort() -> None:
        torch.empty_like(ys).index_copy_(0, order, ys)

    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
    row("unsort [20480,1024]: index_copy_", gpu_us(old_unsort, iters, False),
        gpu_us(lambda: fast_moe._rows(ys, order, 1, bf, scatter=True), iters, False), "(new: Triton row scatter)")
    row("unsort: index_select(inv) (alt)", None, gpu_us(lambda: ys.index_select(0, inv), iters, False))
    row("gather x rows [20480,2048]", gpu_us(lambda: x.index_select(0, torch.div(order, K_TOP, rounding_mode="floor")),
                                             iters, False),
        gpu_us(lambda: fast_moe._rows(x, order, K_TOP, bf, scatter=False), iters, False))
    row("top-k [2048,512]", gpu_us(lambda: old_topk(logits, K_TOP), iters, False),
        gpu_us(lambda: moe_router.topk_softmax(logits, K_TOP, choices=CHOICES), iters, False))
    y = torch.randn(T, K_TOP, H, device=dev, dtype=bf)
    wts = torch.rand(T, K_TOP, device=dev)
    row("moe_sum [2048,10,2048]", gpu_us(lambda: old_sum(y, wts), iters, False),
        gpu_us(lambda: moe_router.moe_sum(y, wts), iters, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-sweep", action="store_true", help="skip the GEMV (BN, BK, warps) sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe.py: skipped: needs a CUDA GPU")
        return
    if triton is None:
        sys.exit("bench_moe.py: Triton is not installed; the fast paths need it")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, E={E} k={K_TOP} H={H} I={I}")
    decode(args.iters, not args.no_sweep)
    prefill(args.iters)


if __name__ == "__main__":
    main()
