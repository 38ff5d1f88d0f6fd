"""ik_llama.cpp and graphir side by side on one GPU, on the same GGUF files (issues 16 and 19).

    python3 bench/bench_peer.py build  --src IK.tar.gz --dir WORK [--detach] [--jobs 12]
    python3 bench/bench_peer.py wait   --dir WORK [--timeout 540]
    python3 bench/bench_peer.py write  --dir WORK --set dense|next [--types f16,q8_0,...]
    python3 bench/bench_peer.py ik     --dir WORK --set dense|next [--delete]
    python3 bench/bench_peer.py ops    --dir WORK [--types f16,q8_0,...]
    python3 bench/bench_peer.py graphir --dir WORK [--only qwen3-8b,...] [--keep-quant --suffix -kq] [--kv-type q8_0]
    python3 bench/bench_peer.py report --dir WORK --out OUT

Everything a step produces goes under WORK/results (CSV per run, one log per command, runs.jsonl
with every command, its exit code and duration); `report` prints one comparison table with the
graphir/ik ratios and packs WORK/results into OUT/peer_results.tar.gz (OUT defaults to $OUT).
A failed run is recorded and the step goes on. Nothing here needs the network: the ik_llama.cpp
source comes as a tarball, the weights are random (graphir's GGUF writer).

Sweeps: `llama-sweep-bench -c 18432 -ub 2048 -b 2048 -ngl 99 -fa on -n 128` (rows N_KV = 0, 2048,
..., 16384) and `graphir run --ubatch 2048 --tg 128 --ctx 18432` (the same rows). The files have
no vocabulary (tokenizer model `none`), so ik's single-token warm-up (BOS, which is -1 without a
vocabulary) is replaced by its batch warm-up: `--no-warmup -wb`.
"""

# bench: needs a CUDA GPU  (`make bench` skips this script on a machine without one)

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reports.sweep import SweepTable, TableError, parse_table, read_table, write_csv  # noqa: E402

DENSE = "qwen3-8b"
NEXT = "qwen3-next-80b-a3b"
NEXT_LAYERS = 8
SETS = {  # file set -> (model, layers, weight types)
    "dense": (DENSE, None, ("f16", "q8_0", "q4_0", "q4_k_m", "iq4_xs", "iq4_ks")),
    "next": (NEXT, NEXT_LAYERS, ("bf16", "iq4_xs")),
}
SWEEP = ["-c", "18432", "-ub", "2048", "-b", "2048", "-ngl", "99", "-fa", "on", "-n", "128", "--no-warmup", "-wb"]
GRAPHIR_CTX = "18432"
OPS_TYPES = ("f16", "q8_0", "q4_0", "iq4_xs", "q4_K", "q6_K", "iq4_ks")
TARGETS = ("llama-sweep-bench", "graphir-peer-ops")


# ---- bookkeeping --------------------------------------------------------------------------

class Work:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.results = self.root / "results"
        self.logs = self.results / "logs"
        self.models = self.root / "models"
        self.build = self.root / "build"
        self.src = self.root / "src"
        for d in (self.results, self.logs, self.models):
            d.mkdir(parents=True, exist_ok=True)

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with (self.logs / "bench_peer.log").open("a") as f:
            f.write(line + "\n")

    def record(self, entry: dict) -> None:
        with (self.results / "runs.jsonl").open("a") as f:  # one line per run: steps may run side by side
            f.write(json.dumps(entry) + "\n")

    def run(self, name: str, cmd: list[str], *, timeout: float, env: dict | None = None,
            cwd: Path | None = None) -> tuple[int, str]:
        """Run one command, its output to logs/NAME.log; never raises. (exit code, output)."""
        log = self.logs / f"{name}.log"
        self.say(f"run {name}: {' '.join(cmd)}")
        t0 = time.time()
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                               timeout=timeout, env=env, cwd=cwd)
            rc, out = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            rc, out = 124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        except OSError as e:
            rc, out = 127, f"{type(e).__name__}: {e}\n"
        dt = time.time() - t0
        log.write_text(f"$ {' '.join(cmd)}\n{out}\n[exit {rc} after {dt:.1f} s]\n")
        self.record({"name": name, "cmd": cmd, "rc": rc, "seconds": round(dt, 1), "log": str(log.name)})
        self.say(f"  {name}: exit {rc} after {dt:.1f} s")
        return rc, out


def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown GPU"


def _ik_commit(w: Work) -> str:
    f = w.src / "COMMIT"
    return f.read_text().strip() if f.is_file() else "unknown"


def _disk(w: Work) -> str:
    u = shutil.disk_usage(w.root)
    return f"disk free {u.free / 2**30:.1f} GiB of {u.total / 2**30:.1f}"


# ---- build --------------------------------------------------------------------------------

PEER_OPS_CMAKE = """add_executable(graphir-peer-ops peer_ops.cpp)
target_link_libraries(graphir-peer-ops PRIVATE ggml ${CMAKE_THREAD_LIBS_INIT})
target_compile_features(graphir-peer-ops PRIVATE cxx_std_17)
"""


def cmd_build(a: argparse.Namespace) -> int:
    w = Work(a.dir)
    if a.detach:  # the same command in its own session, so the caller's call can end
        args = [sys.executable, str(Path(__file__).resolve())] + [x for x in sys.argv[1:] if x != "--detach"]
        with (w.logs / "build_detached.log").open("a") as f:
            subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        w.say(f"build started in the background: {w.logs / 'build_detached.log'}")
        return 0
    done = w.root / "build.done"
    done.unlink(missing_ok=True)
    t0 = time.time()
    if not (w.src / "CMakeLists.txt").is_file():
        w.say(f"unpacking {a.src} into {w.src}")
        with tarfile.open(a.src) as t:
            t.extractall(w.root / "unpack")
        top = next((w.root / "unpack").iterdir())
        top.rename(w.src)
        if a.commit:
            (w.src / "COMMIT").write_text(a.commit + "\n")
        ops = w.src / "examples" / "graphir-peer-ops"
        ops.mkdir()
        shutil.copy(ROOT / "bench" / "peer_ops.cpp", ops / "peer_ops.cpp")
        (ops / "CMakeLists.txt").write_text(PEER_OPS_CMAKE)
        with (w.src / "examples" / "CMakeLists.txt").open("a") as f:
            f.write("\nadd_subdirectory(graphir-peer-ops)\n")
    cfg = ["cmake", "-S", str(w.src), "-B", str(w.build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
           "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={a.arch}", "-DGGML_NCCL=OFF", "-DLLAMA_CURL=OFF",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_IQK_FA_ALL_QUANTS=OFF", "-DGGML_NATIVE=ON"]
    rc, _ = w.run("build_configure", cfg, timeout=600)
    if rc == 0:
        targets = [t for t in (a.targets.split(",") if a.targets else TARGETS) if t]
        rc, _ = w.run("build_ninja", ["ninja", "-C", str(w.build), "-j", str(a.jobs), *targets], timeout=3000)
    done.write_text(f"{rc}\n")
    w.say(f"build finished: exit {rc} after {time.time() - t0:.0f} s")
    return 0 if rc == 0 else 1


def cmd_wait(a: argparse.Namespace) -> int:
    w = Work(a.dir)
    done = w.root / "build.done"
    t0 = time.time()
    while not done.is_file() and time.time() - t0 < a.timeout:
        time.sleep(5)
    if not done.is_file():
        w.say(f"build not finished after {a.timeout:.0f} s")
        return 1
    rc = int(done.read_text().strip() or 1)
    w.say(f"build done (exit {rc}), waited {time.time() - t0:.0f} s")
    return 0 if rc == 0 else 1


def _bin(w: Work, name: str) -> Path:
    return w.build / "bin" / name


# ---- GGUF files -----------------------------------------------------------------------------

def _files(w: Work, set_name: str, types: list[str] | None) -> list[tuple[str, str, Path]]:
    model, layers, default = SETS[set_name]
    tag = model + (f"-L{layers}" if layers else "")
    return [(model, t, w.models / f"{tag}-{t}.gguf") for t in (types or default)]


def storage(cfg, t: str) -> tuple[str, dict[str, str] | None, int]:
    """A weight type of the writer (`q4_0`), or a llama.cpp file type (`q4_k_m`: q4_k with q6_k for
    the tensors llama-quantize gives more bits) as per-tensor types: (wtype, types, data bytes)."""
    from graphir.dtypes import dtype
    from graphir.models.gguf_writer import TYPES, file_size, tensor_specs
    from graphir.quant import file_type

    if t.lower() in TYPES:
        return t, None, file_size(cfg, t)
    scheme = file_type(t)
    types = {s.name: scheme(s.name, s.shape, cfg.n_layer).name for s in tensor_specs(cfg)}
    size = sum(dtype(types[s.name]).row_bytes(s.shape[-1]) * math.prod(s.shape[:-1]) for s in tensor_specs(cfg))
    matrices = [v for v in types.values() if v != "f32"]
    return max(sorted(set(matrices)), key=matrices.count), types, size  # the file's main type names it


def cmd_write(a: argparse.Namespace) -> int:
    from graphir.models.gguf_writer import write_gguf
    from graphir.models.sources import load_preset

    w = Work(a.dir)
    model, layers, _ = SETS[a.set]
    cfg = load_preset(model)
    if layers:
        cfg = cfg.with_layers(layers)
    bad = 0
    for _, t, path in _files(w, a.set, a.types):
        wtype, types, need = storage(cfg, t)
        if path.is_file() and path.stat().st_size >= need:
            w.say(f"{path.name}: exists ({path.stat().st_size / 1e9:.2f} GB)")
            continue
        if shutil.disk_usage(w.root).free < need + 2**30:
            w.say(f"{path.name}: skipped, needs {need / 1e9:.2f} GB; {_disk(w)}")
            w.record({"name": f"write_{path.stem}", "rc": 28, "seconds": 0})
            bad += 1
            continue
        t0 = time.time()
        try:
            write_gguf(path, cfg, wtype=wtype, types=types, seed=a.seed)
            rc = 0
        except Exception as e:  # record and go on with the next file
            w.say(f"{path.name}: failed: {type(e).__name__}: {e}")
            rc, bad = 1, bad + 1
        dt = time.time() - t0
        w.record({"name": f"write_{path.stem}", "rc": rc, "seconds": round(dt, 1)})
        if rc == 0:
            w.say(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB in {dt:.1f} s; {_disk(w)}")
    return 1 if bad else 0


# ---- ik_llama.cpp ---------------------------------------------------------------------------

def sweep_rows(text: str, source: str) -> SweepTable:
    """llama-sweep-bench's markdown table out of its full output (log lines around it)."""
    return parse_table("\n".join(s for s in text.splitlines() if s.strip().startswith("|")), source)


def cmd_ik(a: argparse.Namespace) -> int:
    w = Work(a.dir)
    exe = _bin(w, "llama-sweep-bench")
    gpu, commit, bad = _gpu_name(), _ik_commit(w), 0
    for model, t, path in _files(w, a.set, a.types):
        if not path.is_file():
            w.say(f"{path.name}: missing, not run")
            bad += 1
            continue
        cmd = [str(exe), "-m", str(path), *SWEEP]
        rc, out = w.run(f"ik_{path.stem}", cmd, timeout=a.timeout)
        try:
            rows = sweep_rows(out, f"ik_{path.stem}")
            note = f"ik_llama.cpp {commit} llama-sweep-bench; model {path.stem} ({model}); weights {t}; " \
                   f"flags {' '.join(SWEEP)}; {gpu}"
            write_csv(rows.rows, w.results / f"ik_{path.stem}.csv", comment=note)
        except TableError as e:
            w.say(f"  no table from {path.name}: {e}")
            bad += 1
        if rc:
            bad += 1
        if a.delete:
            path.unlink(missing_ok=True)
            w.say(f"  deleted {path.name}; {_disk(w)}")
    return 1 if bad else 0


def cmd_ops(a: argparse.Namespace) -> int:
    """graphir-peer-ops once per weight type (an abort in one type's kernels loses only that type)."""
    w = Work(a.dir)
    exe = _bin(w, "graphir-peer-ops")
    header, lines, bad = None, [], 0
    jobs = [("ops_fa", [str(exe), "", a.fa_types])] + [(f"ops_{t}", [str(exe), t, ""]) for t in (a.types or OPS_TYPES)]
    jobs.append(("ops_delta", [str(exe), "", "", "delta"]))  # the fused gated delta rule (Qwen3-Next)
    for name, cmd in jobs:
        rc, out = w.run(name, cmd, timeout=a.timeout)
        bad += rc != 0
        for s in out.splitlines():
            if s.startswith("op,"):
                header = s
            elif s.count(",") == 9 and s.split(",")[0] in ("MUL_MAT", "MUL_MAT_ID", "FLASH_ATTN_EXT", "DELTA_NET"):
                lines.append(s)
    if header:
        note = f"# ik_llama.cpp {_ik_commit(w)} ggml kernels (bench/peer_ops.cpp) on {_gpu_name()}\n"
        (w.results / "ik_ops.csv").write_text(note + header + "\n" + "\n".join(lines) + "\n")
        w.say(f"ik_ops.csv: {len(lines)} cases")
    return 1 if bad else 0


# ---- graphir --------------------------------------------------------------------------------

def _graphir_jobs(w: Work) -> list[tuple[str, list[str]]]:
    sweep = ["--devices", "cuda:0", "--ubatch", "2048", "--tg", "128", "--ctx", GRAPHIR_CTX]
    jobs = [(f"graphir_{DENSE}-bf16", [DENSE, *sweep, "--dtype", "bf16"]),
            ("graphir_qwen3-32b-bf16", ["qwen3-32b", *sweep, "--dtype", "bf16"]),
            (f"graphir_{NEXT}-L{NEXT_LAYERS}-bf16", [NEXT, *sweep, "--dtype", "bf16", "--layers", f"0:{NEXT_LAYERS}"])]
    for set_name in SETS:  # every file written, at its own width: quantised files compute in bf16
        for _, t, path in _files(w, set_name, None):
            jobs.append((f"graphir_{path.stem}", [str(path), *sweep, "--dtype", "f16" if t == "f16" else "bf16"]))
    return jobs


def cmd_graphir(a: argparse.Namespace) -> int:
    w = Work(a.dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    only = set(a.only or [])
    bad = 0
    for name, args in _graphir_jobs(w):
        if only and not any(o in name for o in only):
            continue
        if args[0].endswith(".gguf") and not Path(args[0]).is_file():
            w.say(f"{name}: {args[0]} missing, not run")
            continue
        csv_path = w.results / f"{name}{a.suffix}.csv"
        extra = ["--kv-type", a.kv_type] if a.kv_type else []
        if a.keep_quant and args[0].endswith(".gguf"):  # a float file has no blocks to keep
            extra.append("--keep-quant")
        cmd = [sys.executable, "-m", "cli.main", "run", *args, *extra, "--format", "csv", "-o", str(csv_path)]
        rc, _ = w.run(name + a.suffix, cmd, timeout=a.timeout, env=env, cwd=ROOT)
        bad += rc != 0
    return 1 if bad else 0


# ---- report ---------------------------------------------------------------------------------

def _at(t: SweepTable, n_kv: int):
    return next((r for r in t.rows if r.n_kv == n_kv), None)


def comparison(results: Path) -> str:
    """One markdown table: each ik sweep against the graphir sweep of the same model and width."""
    tables = {}
    for p in sorted(results.glob("*.csv")):
        if p.name == "ik_ops.csv":
            continue
        try:
            tables[p.stem] = read_table(p)
        except TableError:
            continue
    ik = {k[3:]: v for k, v in tables.items() if k.startswith("ik_")}
    gr = {k[8:]: v for k, v in tables.items() if k.startswith("graphir_")}
    pairs = []
    for stem, t in ik.items():
        model, _, wt = stem.rpartition("-")
        # the same file, every way graphir ran it (a --suffix run, e.g. `-kq` for --keep-quant);
        # else graphir's bf16 sweep of the same model
        same = [k for k in sorted(gr) if k == stem or k.startswith(stem + "-")]
        if not same:
            same = [next((k for k in gr if k.startswith(model + "-") and not k.endswith(".gguf")), "")]
        pairs += [(stem, t, k or None, gr.get(k) if k else None) for k in same]
    lines = ["| model | ik weights | graphir run | N_KV | ik S_PP | graphir S_PP | PP ratio | ik S_TG | "
             "graphir S_TG | TG ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stem, t, g_key, g in pairs:
        model, _, wt = stem.rpartition("-")
        for n_kv in (0, 16384):
            a, b = _at(t, n_kv), _at(g, n_kv) if g else None
            if a is None:
                continue
            f = lambda x: f"{x:,.1f}"  # noqa: E731
            pp = f"{b.s_pp_tps / a.s_pp_tps:.2f}x" if b else "-"
            tg = f"{b.s_tg_tps / a.s_tg_tps:.2f}x" if b else "-"
            lines.append(f"| {model} | {wt} | {g_key or '-'} | {n_kv} | {f(a.s_pp_tps)} | "
                         f"{f(b.s_pp_tps) if b else '-'} | {pp} | {f(a.s_tg_tps)} | {f(b.s_tg_tps) if b else '-'} | {tg} |")
    for key, g in sorted(gr.items()):  # graphir sweeps without an ik partner, for the record
        if key not in {p[2] for p in pairs}:
            for n_kv in (0, 16384):
                b = _at(g, n_kv)
                if b:
                    lines.append(f"| {key} | - | {key} | {n_kv} | - | {b.s_pp_tps:,.1f} | - | - | "
                                 f"{b.s_tg_tps:,.1f} | - |")
    return "\n".join(lines) + "\n"


def cmd_report(a: argparse.Namespace) -> int:
    w = Work(a.dir)
    out = Path(a.out or os.environ.get("OUT") or w.root / "out")
    out.mkdir(parents=True, exist_ok=True)
    table = comparison(w.results)
    path = w.results / "runs.jsonl"
    runs = [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []
    failed = [f"{r['name']} (exit {r['rc']})" for r in runs if r.get("rc")]
    text = f"# ik_llama.cpp {_ik_commit(w)} and graphir on {_gpu_name()}\n\n{table}\n" \
           f"runs: {len(runs)}, failed: {', '.join(failed) or 'none'}\n"
    (w.results / "report.md").write_text(text)
    print(text)
    with tarfile.open(out / f"peer_results{a.tag}.tar.gz", "w:gz") as t:
        t.add(w.results, arcname="peer_results")
    shutil.copy(w.results / "report.md", out / f"report{a.tag}.md")
    print(f"packed {w.results} into {out / f'peer_results{a.tag}.tar.gz'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build")
    p.add_argument("--src", required=True, help="ik_llama.cpp source tarball")
    p.add_argument("--commit", default="", help="the tarball's commit, recorded in the CSVs")
    p.add_argument("--arch", default="90")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 4) - 2))
    p.add_argument("--detach", action="store_true", help="build in the background and return")
    p.add_argument("--targets", default="", help="comma-separated build targets (default: all this script runs)")
    p = sub.add_parser("wait")
    p.add_argument("--timeout", type=float, default=540)
    for name in ("write", "ik"):
        p = sub.add_parser(name)
        p.add_argument("--set", choices=sorted(SETS), required=True)
        p.add_argument("--types", type=lambda s: s.split(","), default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--timeout", type=float, default=240, help="per sweep")
        p.add_argument("--delete", action="store_true", help="delete each file after its sweep")
    p = sub.add_parser("ops")
    p.add_argument("--types", type=lambda s: s.split(","), default=None)
    p.add_argument("--fa-types", default="f16,q8_0")
    p.add_argument("--timeout", type=float, default=120, help="per weight type")
    p = sub.add_parser("graphir")
    p.add_argument("--only", type=lambda s: s.split(","), default=None)
    p.add_argument("--suffix", default="", help="appended to CSV names (a repeat run, or `-kq` with --keep-quant)")
    p.add_argument("--keep-quant", action="store_true", help="GGUF files: keep their blocks on the GPU (graphir run --keep-quant)")
    p.add_argument("--kv-type", default="", help="graphir run --kv-type (e.g. q8_0)")
    p.add_argument("--timeout", type=float, default=240, help="per run")
    p = sub.add_parser("report")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    for p in sub.choices.values():
        p.add_argument("--dir", required=True, help="work directory on this machine (sources, build, files)")
    args = sys.argv[1:] if argv is None else argv
    if not args:  # `make bench`: the steps need ik's source and a GPU machine; say so and pass
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        print("bench_peer.py: skipped: needs a CUDA GPU" if not gpu else ap.format_usage().strip())
        return 0
    a = ap.parse_args(args)
    return {"build": cmd_build, "wait": cmd_wait, "write": cmd_write, "ik": cmd_ik, "ops": cmd_ops,
            "graphir": cmd_graphir, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
