"""Issue 15 item 7: `make bench` passes on a machine without CUDA, running the CPU benchmarks and
naming the GPU ones it skipped; every GPU script runs with its defaults (and skips itself without
a GPU); `make figures` fails, in one line, when the measured tables it draws are missing.

The Makefile runs on copies in a temporary folder (CUDA hidden, the setup target taken as done),
so nothing here touches the virtual environment or docs/img.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MARK = "# bench: needs a CUDA GPU"
GPU_SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if MARK in p.read_text(encoding="utf-8"))
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


def make(folder: Path, target: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("no make here")
    # -o: take the setup stamp as up to date (never build a virtual environment from a test)
    return subprocess.run(["make", "-s", "-C", str(folder), "-o", ".venv/.stamp", target, f"PY={sys.executable}"],
                          capture_output=True, text=True, env=NO_CUDA, timeout=300)


def test_every_script_using_cuda_is_marked() -> None:
    uses = sorted(p.name for p in BENCH.glob("*.py") if "torch.cuda" in p.read_text(encoding="utf-8")
                  and p.name != "figures.py")
    assert uses and uses == GPU_SCRIPTS


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_skip_themselves_with_their_defaults(script: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    p = subprocess.run([sys.executable, str(BENCH / script)], capture_output=True, text=True, env=NO_CUDA,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == [f"{script}: skipped: needs a CUDA GPU"]
    assert list(tmp_path.iterdir()) == []


def test_make_bench_without_cuda_runs_the_cpu_ones_and_lists_the_skipped(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "bench").mkdir()
    for name in [*GPU_SCRIPTS, "bench_lower.py", "figures.py", "bench_gpu_report.py"]:  # one quick CPU benchmark
        shutil.copy(BENCH / name, tmp_path / "bench")
    p = make(tmp_path, "bench")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert "== bench/bench_lower.py" in lines
    assert not any(line.startswith("== ") and "bench_lower" not in line for line in lines)
    assert lines[-1] == "skipped (they need a CUDA GPU): " + " ".join(f"bench/{s}" for s in GPU_SCRIPTS)


def test_make_figures_fails_without_the_measured_tables(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "bench").mkdir()
    shutil.copy(BENCH / "figures.py", tmp_path / "bench")  # its ROOT is tmp_path: no measured tables there
    p = make(tmp_path, "figures")
    assert p.returncode != 0
    err = [line for line in p.stderr.splitlines() if not line.startswith("make")]
    assert len(err) == 1 and "missing" in err[0] and "measured" in err[0]
    assert not (tmp_path / "docs").exists()  # nothing drawn
