"""GPU microseconds of a decode step's kernels, each against its alternatives (one GPU).

    python3 bench/bench_decode.py [--out results.json]

Every time is the median of single calls with L2 flushed before each (gemv._time): in a decode
step each weight and cache row is read once per token, from HBM. Shapes are Qwen3-Next-80B-A3B's
(and qwen3-32b's attention heads); bf16.

  attention   one query over a cache bucket: the torch ops (mask, bmm, scale, masked fill,
              softmax, cast, bmm) against decode_attention's two launches at its own split
              size and at fixed ones
  layer end   moe_sum + add_rms_norm against moe_add_rms_norm (one launch)
  gemv        cuBLAS against each Triton GEMV tile, per projection shape: µs and TB/s
  moe gemv    the expert GEMV's tiles over 11 slots (top-10 + the folded shared expert),
              gate/up and down (down with the swiglu read as it loads)
"""

from __future__ import annotations

# bench: needs a CUDA GPU  (`make bench` skips this script on a machine without one)

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backends.cuda.triton_kernels import decode_attention as da  # noqa: E402
from backends.cuda.triton_kernels import fast_moe, fused, gemv, moe_router  # noqa: E402

DEV = torch.device("cuda:0")
BF = torch.bfloat16


def us(fn) -> float:
    return gemv._time(fn, DEV) * 1e3


def attention_rows() -> list[dict]:
    rows = []
    for hq, hkv, d in ((16, 2, 256), (64, 8, 128)):
        for depth in (0, 2048, 8192, 16384):
            S = -(-(depth + 128) // 256) * 256
            pos = torch.tensor([depth + 64], device=DEV)
            q = torch.randn(1, hq, d, device=DEV, dtype=BF)
            k, v = (torch.randn(S, hkv, d, device=DEV, dtype=BF) for _ in range(2))
            keys = torch.arange(S, device=DEV)
            g = hq // hkv

            def torch_ops() -> torch.Tensor:  # fastpath.attention's T = 1 bucket path
                mask = keys[None, :] <= (pos + torch.zeros(1, dtype=torch.int64, device=DEV))[:, None]
                s = torch.bmm(q.reshape(hkv, g, d), k.permute(1, 2, 0)) * d ** -0.5
                s = s.masked_fill(~mask.view(1, 1, S), float("-inf"))
                p = torch.softmax(s, dim=-1, dtype=torch.float32).to(BF)
                return torch.bmm(p, v.permute(1, 0, 2))

            row = {"heads": f"{hq}/{hkv}x{d}", "depth": depth, "bucket": S, "torch_us": us(torch_ops),
                   "auto_split": da.split_rows(S, hkv, 32 if d > 128 else 64),
                   "auto_us": us(lambda: da.decode_attention(q, k, v, pos, d ** -0.5))}
            for split in (64, 128, 256, 512, 1024):
                if split <= S:
                    row[f"split{split}_us"] = us(lambda split=split: da.decode_attention(q, k, v, pos, d ** -0.5, split))
            rows.append(row)
    return rows


def layer_end_rows() -> list[dict]:
    H, k = 2048, 11
    a, y = torch.randn(1, H, device=DEV, dtype=BF), torch.randn(1, k, H, device=DEV, dtype=BF)
    wk, w = torch.rand(1, k, device=DEV), torch.randn(H, device=DEV, dtype=BF)
    return [{"apart_us": us(lambda: fused.add_rms_norm(a, moe_router.moe_sum(y, wk), w, 1e-6, 1.0))},
            {"one_launch_us": us(lambda: moe_router.moe_add_rms_norm(a, y, wk, w, 1e-6, 1.0))}]


def gemv_rows() -> list[dict]:
    rows = []
    for n, k in ((528, 2048), (2048, 4096), (9216, 2048), (12352, 2048), (151936, 2048)):
        x, w = torch.randn(1, k, device=DEV, dtype=BF), torch.randn(n, k, device=DEV, dtype=BF)
        mb = n * k * 2 / 1e6
        row = {"shape": f"{n}x{k}", "MB": round(mb, 1), "cublas_us": us(lambda: F.linear(x, w))}
        for cfg in gemv.CONFIGS:
            try:
                row[",".join(map(str, cfg))] = us(lambda cfg=cfg: gemv._triton(x, w, cfg))
            except Exception as e:  # a tile this GPU cannot compile
                row[",".join(map(str, cfg))] = f"{type(e).__name__}"
        best = min((v, key) for key, v in row.items() if (key == "cublas_us" or "," in key) and isinstance(v, float))
        row["best"], row["best_TBps"] = best[1], round(mb / best[0], 3)  # MB per µs = TB/s
        rows.append(row)
    return rows


def moe_rows() -> list[dict]:
    rows = []
    E, slots = 513, 11
    ids = torch.randperm(E, device=DEV)[:slots].to(torch.int32).view(1, slots)
    for name, n, k, gated in (("gate_up", 1024, 2048, False), ("down+swiglu", 2048, 512, True)):
        w = torch.randn(E, n, k, device=DEV, dtype=BF)
        x = torch.randn(1, slots, 2 * k, device=DEV, dtype=BF) if gated else torch.randn(1, k, device=DEV, dtype=BF)
        g, u = (x[..., :k], x[..., k:]) if gated else (x, None)
        mb = slots * n * k * 2 / 1e6
        row = {"proj": name, "MB": round(mb, 1)}
        for cfg in dict.fromkeys((fast_moe.gemv_config(n, k), *fast_moe.GEMV_TILES)):
            row[",".join(map(str, cfg))] = us(lambda cfg=cfg: fast_moe.moe_gemv(g, w, ids, cfg, up=u))
        best = min((v, key) for key, v in row.items() if "," in key)
        row["best"], row["best_TBps"] = best[1], round(mb / best[0], 3)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode.py: skipped: needs a CUDA GPU")
        return
    if fused.triton is None:
        print("bench_decode: needs Triton; nothing measured")
        return
    res = {"gpu": torch.cuda.get_device_name(DEV)}
    for name, fn in (("attention", attention_rows), ("layer end", layer_end_rows), ("gemv", gemv_rows),
                     ("moe gemv", moe_rows)):
        res[name] = fn()
        print(f"\n## {name} (µs per call, L2 cold)\n\n{table(res[name])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
