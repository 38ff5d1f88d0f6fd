"""GPU measurements behind docs/results: ceilings, correctness checks on the GPUs, sweep tables.

    python3 bench/bench_gpu.py [OUTDIR] [--stages ceil,equal,dist,a,hf,b,c,tests] [--budget 540]

Runs on a machine with one or two GPUs and writes OUTDIR/results.json, rewritten after every
stage (so a run cut short keeps what it finished). Stages:
  ceil   device-to-device copy bandwidth and the 8192^3 bf16 matmul rate, per GPU
  equal  Qwen3-Next layers 0:4 at full width on one GPU and on two (layer, graph single/split):
         prefill + eager decode + captured decode logits, compared (bf16; f32 for one pair)
  dist   the same layer / graph placements as one process per GPU (torchrun), against `equal`
  a      Qwen3-Next-80B-A3B layers 0:8, bf16, cuda:0, sweep to 16k (ubatch 2048, tg 128)
  hf     transformers' Qwen3NextForCausalLM with the same 8 layers, eager, bf16: PP 2048, TG
  b      the full model on 2 GPUs: layer, graph (recurrent single, split), sweep to 32k
  b      (also auto, searched for 2xH200 with the graphir-cuda engine)
  c      qwen3-32b on 2 GPUs: layer, graph, auto, sweep to 16k
  c_auto qwen3-32b on 2 GPUs, auto only
  d      every GPU of the machine (4 or 8): Qwen3-Next and llama-3-70b, layer, graph (all GPUs and
         two per layer), auto
  tests  pytest tests/backends/cuda/test_exec_cuda.py (the CUDA paths against the reference kernels)
bench/bench_gpu_report.py turns results.json into the markdown and CSV files.
"""

from __future__ import annotations

# bench: needs a CUDA GPU  (`make bench` skips this script on a machine without one)

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

T0 = time.perf_counter()
NEXT = "qwen3-next-80b-a3b"
PROMPT_LEN, DECODE = 300, [11, 22, 33, 44]
SCRATCH = Path(tempfile.gettempdir()) / "graphir_bench"  # logits the checks share (not results)
DEVS = ("cuda:0", "cuda:1")
HF_CONFIG: dict[str, Any] = {}  # overrides of Qwen3NextConfig's defaults (smaller models for a dry run)
VOCAB = 151936
DEADLINE = 0.0  # perf_counter time after which no new sweep starts (0: none)
ONLY: set[str] = set()  # --only: run just these sweeps of stages b, c and d (re-runs)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- ceilings ---------------------------------------------------------------------------------

def ceilings(res: dict[str, Any], out: Path) -> None:
    per = {}
    for d in range(torch.cuda.device_count()):
        dev = torch.device("cuda", d)
        n = 4 << 30
        a = torch.empty(n, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        b.copy_(a)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(dev):
            s.record()
            for _ in range(10):
                b.copy_(a)
            e.record()
        e.synchronize()
        copy_bps = 2 * n * 10 / (s.elapsed_time(e) / 1e3)  # bytes read + written
        del a, b
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
        y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
        for _ in range(3):
            x @ y
        with torch.cuda.device(dev):
            s.record()
            for _ in range(10):
                x @ y
            e.record()
        e.synchronize()
        flops = 2 * 8192 ** 3 * 10 / (s.elapsed_time(e) / 1e3)
        del x, y
        per[f"cuda:{d}"] = {"copy_bytes_per_s": copy_bps, "bf16_matmul_flops": flops}
        log(f"cuda:{d}: copy {copy_bps / 1e12:.3f} TB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s")
    res["ceilings"] = per
    free()


# ---- correctness on the GPUs --------------------------------------------------------------------

def _transform(cfg: Any, split: str | None, recurrent: str = "single") -> list[Callable[..., Any]]:
    from cli.run import DEFAULT_PASSES, make_transform

    devs = DEVS if split else DEVS[:1]
    return make_transform(cfg, devs, split, None, None, recurrent, DEFAULT_PASSES)


def _tokens(n: int, seed: int = 5) -> list[int]:
    return torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check_run(split: str | None, recurrent: str, dtype: str) -> dict[str, torch.Tensor]:
    from backends.cuda.capture.decode_step import DecodeStep
    from backends.cuda.runtime.session import Session
    from graphir.models.sources import load_source

    cfg = load_source(NEXT).cfg
    devs = DEVS if split else DEVS[:1]
    s = Session(NEXT, None, devs, 512, dtype=dtype, transform=_transform(cfg, split, recurrent), layers=range(0, 4),
                pp_logits="last", seed=1)
    prompt = _tokens(PROMPT_LEN)
    pre = s.prefill(prompt).cpu()
    eager = s.decode(DECODE).cpu()
    s.reset()
    s.prefill(prompt)
    step = DecodeStep(s, 512)
    rows = []
    for t in DECODE:
        step.step(t)
        rows.append(step.logits.float().cpu().clone())
    out = {"prefill": pre, "decode": eager, "graphed": torch.cat(rows)}
    step.close()
    del step, s
    free()
    return out


def _cmp(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.float(), b.float()
    return {"max_abs_rel": float((a - b).abs().max() / b.abs().max()),
            "norm_rel": float((a - b).norm() / b.norm()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def equal(res: dict[str, Any], out: Path) -> None:
    found: dict[str, Any] = {}
    ref = _check_run(None, "single", "bf16")
    torch.save(ref, SCRATCH / "equal_ref.pt")
    for label, split, rec in (("layer", "layer", "single"), ("graph-single", "graph", "single"),
                              ("graph-split", "graph", "split")):
        got = _check_run(split, rec, "bf16")
        torch.save(got, SCRATCH / f"equal_{label}.pt")
        found[label] = {k: _cmp(got[k], ref[k]) for k in ref}
        found[label]["graphed_vs_eager"] = _cmp(got["graphed"], got["decode"])
        log(f"equal {label}: {found[label]}")
    found["single_graphed_vs_eager"] = _cmp(ref["graphed"], ref["decode"])
    res["equal"] = found


def dist_stage(res: dict[str, Any], out: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(out),
           "--stages", "dist_worker"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    sys.stdout.write(p.stdout[-4000:] + p.stderr[-4000:])
    found = {}
    for split in ("layer", "graph-single"):
        f = SCRATCH / f"dist_{split}.json"
        found[split] = json.loads(f.read_text()) if f.exists() else {"error": f"no result (rc {p.returncode})"}
    res["dist"] = found
    log(f"dist: {found}")


def dist_worker(out: Path) -> None:
    import torch.distributed as dist

    from backends.cuda.runtime.dist import RankSession, init_from_env
    from graphir.models.sources import load_source

    rank, _, local = init_from_env()
    cfg = load_source(NEXT).cfg
    for label, split in (("layer", "layer"), ("graph-single", "graph")):
        s = RankSession(NEXT, None, DEVS, 512, rank=rank, local_device=local, dtype="bf16",
                        transform=_transform(cfg, split), layers=range(0, 4), pp_logits="last", seed=1)
        pre = s.prefill(_tokens(PROMPT_LEN))
        dec = s.decode(DECODE)
        if pre is not None:
            ref = torch.load(SCRATCH / f"equal_{label}.pt")
            doc = {"prefill": _cmp(pre.cpu(), ref["prefill"]), "decode": _cmp(dec.cpu(), ref["decode"]),
                   "rank_with_logits": rank}
            (SCRATCH / f"dist_{label}.json").write_text(json.dumps(doc))
        del s
        free()
        dist.barrier()
    dist.destroy_process_group()


# ---- sweeps ---------------------------------------------------------------------------------------

def _sweep(res: dict[str, Any], key: str, model: str, **kw: Any) -> None:
    from cli.run import run_sweep

    if DEADLINE and DEADLINE - time.perf_counter() < 40:
        log(f"skip {key}: out of time")
        res.setdefault("skipped", []).append(key)
        return
    log(f"{key}: {model} {kw}")
    try:
        r = run_sweep(model, say=lambda m: log(f"  {key} {m}"), **kw)
        rows = [row.__dict__ for row in r["rows"]]
        res.setdefault("sweeps", {})[key] = {"model": model, "args": kw, "meta": r["meta"], "rows": rows}
        del r
    except Exception as e:  # keep the other configurations going
        res.setdefault("sweeps", {})[key] = {"model": model, "args": kw, "error": f"{type(e).__name__}: {e}"}
        log(f"{key} failed: {type(e).__name__}: {e}")
    free()


def stage_a(res: dict[str, Any], out: Path) -> None:
    _sweep(res, "a", NEXT, devices="cuda:0", dtype="bf16", ubatch=2048, tg=128, ctx=16384, layers="0:8")


def stage_b(res: dict[str, Any], out: Path, tg: int, ctx: int = 32768) -> None:
    for key, split, rec in (("b-layer", "layer", "single"), ("b-graph-single", "graph", "single"),
                            ("b-graph-split", "graph", "split"), ("b-auto", "auto", "single")):
        if ONLY and key not in ONLY:
            continue
        _sweep(res, key, NEXT, devices="cuda:0,cuda:1", split=split, recurrent=rec, dtype="bf16", ubatch=2048,
               tg=tg, ctx=ctx, hw="2xH200")
        save(res, out)


def stage_c(res: dict[str, Any], out: Path, tg: int, ctx: int) -> None:
    for key, split in (("c-layer", "layer"), ("c-graph", "graph"), ("c-auto", "auto")):
        if ONLY and key not in ONLY:
            continue
        _sweep(res, key, "qwen3-32b", devices="cuda:0,cuda:1", split=split, dtype="bf16", ubatch=2048, tg=tg,
               ctx=ctx, hw="2xH200")
        save(res, out)


def stage_c_auto(res: dict[str, Any], out: Path, tg: int, ctx: int) -> None:
    _sweep(res, "c-auto", "qwen3-32b", devices="cuda:0,cuda:1", split="auto", dtype="bf16", ubatch=2048, tg=tg,
           ctx=ctx, hw="2xH200")
    save(res, out)


def stage_d(res: dict[str, Any], out: Path, tg: int, ctx: int) -> None:
    """Every GPU of the machine (4 or 8): layer, graph over all of them, graph with two GPUs per
    layer, auto; Qwen3-Next-80B-A3B and llama-3-70b."""
    n = torch.cuda.device_count()
    devs = ",".join(f"cuda:{k}" for k in range(n))
    for model, tag in ((NEXT, "next"), ("llama-3-70b", "l70")):
        for key, kw in ((f"d{n}-{tag}-layer", {"split": "layer"}), (f"d{n}-{tag}-graph", {"split": "graph"}),
                        (f"d{n}-{tag}-graph-mg2", {"split": "graph", "max_gpu": 2}),
                        (f"d{n}-{tag}-auto", {"split": "auto"})):
            if ONLY and key not in ONLY:
                continue
            _sweep(res, key, model, devices=devs, dtype="bf16", ubatch=2048, tg=tg, ctx=ctx, hw=f"{n}xH200", **kw)
            save(res, out)


def hf_stage(res: dict[str, Any], out: Path, eager: bool = True) -> None:
    """transformers, the same 8 layers at full width, random weights drawn on the GPU: eager
    attention and experts (`eager`), or transformers' defaults (sdpa, its default experts path)."""
    import transformers

    cfg = transformers.Qwen3NextConfig(**{"num_hidden_layers": 8, **HF_CONFIG})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVS[0]):
            if not eager:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
            else:
                try:
                    model = transformers.AutoModelForCausalLM.from_config(
                        cfg, attn_implementation="eager", experts_implementation="eager")
                except Exception:  # older transformers: no experts_implementation
                    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16).eval()
    ids = torch.tensor([_tokens(2048)], device=DEVS[0])
    found: dict[str, Any] = {"transformers": transformers.__version__,
                             "attn": getattr(model.config, "_attn_implementation", None),
                             "experts": getattr(model.config, "_experts_implementation", None)}

    def decode(n: int, cache: Any) -> tuple[float, Any]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            o = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            o.logits.float().cpu()  # the token is done before the next, as in the sweep
        return time.perf_counter() - t0, cache

    with torch.inference_mode():
        o = model(ids[:, :256], use_cache=True)  # warm-up
        decode(2, o.past_key_values)
        del o
        tg = 32
        t_tg, _ = decode(tg, None)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = model(ids, use_cache=True, logits_to_keep=1)
        o.logits.float().cpu()
        t_pp = time.perf_counter() - t0
        t_tg2, _ = decode(16, o.past_key_values)
    found.update({"pp": 2048, "t_pp_s": t_pp, "s_pp_tps": 2048 / t_pp, "tg": tg, "t_tg_s": t_tg,
                  "s_tg_tps": tg / t_tg, "s_tg_tps_at_2048": 16 / t_tg2})
    res["hf" if eager else "hf-default"] = found
    log(f"hf ({'eager' if eager else 'defaults'}): {found}")
    del model, o
    free()


def prof(res: dict[str, Any], out: Path) -> None:
    """Where the time of (a) goes: kernel tables of one PP batch and of eager decode steps, and
    the captured decode step timed with and without a wait after every token."""
    from torch.profiler import ProfilerActivity, profile

    from backends.cuda.capture.decode_step import DecodeStep
    from backends.cuda.runtime.session import Session
    from backends.cuda.runtime.sweeprun import calibrate, warm_up
    from graphir.models.sources import load_source

    cfg = load_source(NEXT).cfg
    s = Session(NEXT, None, DEVS[:1], 8192, dtype="bf16", transform=_transform(cfg, None), layers=range(0, 8),
                pp_logits="last")
    found: dict[str, Any] = {"calibrate_ms": calibrate(s, 2048)}
    warm_up(s, 2048, 16, True, torch.Generator().manual_seed(0))
    sync = s.streams.synchronize_all

    def table(p: Any) -> str:
        for key in ("self_device_time_total", "self_cuda_time_total", "cuda_time_total"):
            try:
                return p.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
            except Exception:
                continue
        return ""

    ids = _tokens(2048)
    s.prefill(ids)
    sync()
    s.reset()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        s.prefill(ids)
        sync()
    found["pp_table"] = table(p)
    print(found["pp_table"], flush=True)
    step = DecodeStep(s, 2048 + 256, capture=False)
    step.step(1)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(4):
            step.step(1)
        sync()
    found["tg_table_4_steps"] = table(p)
    print(found["tg_table_4_steps"], flush=True)
    del step
    s.reset()
    s.prefill(ids)
    step = DecodeStep(s, 2048 + 256)
    for wait in (True, False):
        sync()
        t0 = time.perf_counter()
        for _ in range(64):
            step.step(1)
            if wait:
                sync()
        sync()
        found[f"tg_ms_per_token_wait_{wait}"] = (time.perf_counter() - t0) / 64 * 1e3
        step._reset_positions()
    host = []  # how long the host takes to hand a step to the GPU (the replay call itself)
    for _ in range(32):
        sync()
        t0 = time.perf_counter()
        step.step(1)
        host.append(time.perf_counter() - t0)
    sync()
    step._reset_positions()
    found["tg_host_ms_per_step"] = sorted(host)[len(host) // 2] * 1e3
    log(f"prof: host time of one captured step call {found['tg_host_ms_per_step']:.3f} ms")
    step.close()
    found["fast_paths"] = s.choices.diagnostics()
    log(f"prof: fast paths {found['fast_paths']}")
    log(f"prof: calibrate {found['calibrate_ms']}, captured TG ms/token "
        f"{found['tg_ms_per_token_wait_True']:.3f} (wait each), {found['tg_ms_per_token_wait_False']:.3f} (no wait)")
    res["prof"] = found
    del step, s
    free()


def host(res: dict[str, Any], out: Path) -> None:
    """Where the host's time goes in a prefill of (a): cProfile of three u-batches."""
    import cProfile
    import io
    import pstats

    from backends.cuda.runtime.session import Session
    from backends.cuda.runtime.sweeprun import calibrate, warm_up
    from graphir.models.sources import load_source

    cfg = load_source(NEXT).cfg
    s = Session(NEXT, None, DEVS[:1], 8192, dtype="bf16", transform=_transform(cfg, None), layers=range(0, 8),
                pp_logits="last")
    calibrate(s, 2048)
    warm_up(s, 2048, 16, True, torch.Generator().manual_seed(0))
    s.check_specs = False
    ids = _tokens(2048)
    sync = s.streams.synchronize_all
    walls = []
    pr = cProfile.Profile()
    for k in range(4):
        s.reset()
        sync()
        if k:
            pr.enable()
        t0 = time.perf_counter()
        s.prefill(ids)
        t1 = time.perf_counter()
        sync()
        walls.append((t1 - t0, time.perf_counter() - t0))
        pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
    res["host"] = {"launch_s_and_wall_s": walls, "profile": buf.getvalue()}
    print(buf.getvalue()[:6000], flush=True)
    log(f"host: prefill (host call s, wall s): {walls}")
    del s
    free()


def tests(res: dict[str, Any], out: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/backends/cuda/test_exec_cuda.py",
                        "tests/backends/cuda/test_exec_moe_fast.py"],
                       capture_output=True, text=True, timeout=300)
    tail = (p.stdout + p.stderr)[-6000:]
    sys.stdout.write(tail)
    res["tests"] = {"rc": p.returncode, "summary": tail.strip().splitlines()[-1] if tail.strip() else ""}


def save(res: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))


COST = {"ceil": 5, "tests": 40, "equal": 40, "dist": 40, "a": 30, "hf": 30, "hf2": 30, "b": 150, "c": 60, "d": 200, "c_auto": 25,
        "prof": 40, "host": 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=None, help="results folder (default: a new temporary folder)")
    ap.add_argument("--stages", default="ceil,equal,a,hf,b,c,dist,tests")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; stages that would not fit are skipped")
    ap.add_argument("--tg-b", type=int, default=128)
    ap.add_argument("--tg-c", type=int, default=32)
    ap.add_argument("--ctx-c", type=int, default=16384)
    ap.add_argument("--ctx-b", type=int, default=32768)
    ap.add_argument("--tg-d", type=int, default=32)
    ap.add_argument("--ctx-d", type=int, default=16384)
    ap.add_argument("--only", default="", help="stages b, c, d: only these sweep keys (comma separated)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: skipped: needs a CUDA GPU")
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="graphir_bench_gpu."))
    log(f"results in {out}")
    global DEADLINE
    DEADLINE = T0 + args.budget
    ONLY.update(k for k in args.only.split(",") if k)
    out.mkdir(parents=True, exist_ok=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    if stages == ["dist_worker"]:
        dist_worker(out)
        return
    f = out / "results.json"
    res: dict[str, Any] = json.loads(f.read_text()) if f.exists() else {}
    res.setdefault("machine", {})
    res["machine"].update({"host": platform.node(), "torch": torch.__version__, "python": platform.python_version(),
                           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    fns = {"ceil": ceilings, "equal": equal, "dist": dist_stage, "a": stage_a, "hf": hf_stage, "tests": tests,
           "hf2": lambda r, o: hf_stage(r, o, eager=False), "prof": prof, "host": host,
           "b": lambda r, o: stage_b(r, o, args.tg_b, args.ctx_b),
           "d": lambda r, o: stage_d(r, o, args.tg_d, args.ctx_d),
           "c_auto": lambda r, o: stage_c_auto(r, o, args.tg_c, args.ctx_c), "c": lambda r, o: stage_c(r, o, args.tg_c, args.ctx_c)}
    for st in stages:
        left = args.budget - (time.perf_counter() - T0)
        if left < COST[st] * 0.6:
            log(f"skip {st}: {left:.0f}s left")
            res.setdefault("skipped", []).append(st)
            continue
        log(f"stage {st}")
        t0 = time.perf_counter()
        try:
            fns[st](res, out)
        except Exception as e:
            import traceback

            traceback.print_exc()
            res.setdefault("errors", {})[st] = f"{type(e).__name__}: {e}"
        res.setdefault("stage_s", {})[st] = round(time.perf_counter() - t0, 1)
        save(res, out)
        free()
    log("done")


if __name__ == "__main__":
    main()
