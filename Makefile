# graphir developer tasks. Every target installs what it needs into .venv.

PY    := .venv/bin/python
PIP   := .venv/bin/pip
STAMP := .venv/.stamp

.PHONY: setup test run bench figures clean

# Create the virtual environment and install the project (re-runs when
# pyproject.toml changes). The CPU build of torch goes in first so that the
# test extra does not pull the CUDA wheels.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	@if ! command -v dot >/dev/null 2>&1; then \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		echo "installing system graphviz (dot)"; \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y graphviz; \
	fi
	touch $(STAMP)

setup: $(STAMP)

test: setup
	@if $(PY) -c "import xdist" >/dev/null 2>&1; then XDIST="-n auto"; else XDIST=""; fi; \
	$(PY) -m pytest -q -x -p no:cacheprovider $$XDIST

# The main job: predicted llama-sweep-bench tables of Qwen3-Next-80B (IQ4_XS, q8_0 KV) on
# 2x RTX 3090 for both split modes, with the crossover depths.
run: setup
	.venv/bin/graphir predict qwen3-next-80b-a3b --hw 2x3090 --quant IQ4_XS --kv-type q8_0 --split layer,graph

# Run every benchmark script in bench/ with its default arguments. Scripts marked
# `# bench: needs a CUDA GPU` are skipped (and listed) on a machine without one; figures.py
# has its own target and bench_gpu_report.py turns bench_gpu.py's results into docs.
bench: setup
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; \
	then cuda=1; else cuda=0; fi; \
	skipped=""; \
	for f in bench/*.py; do \
		case "$$f" in bench/figures.py|bench/bench_gpu_report.py) continue;; esac; \
		if [ "$$cuda" = 0 ] && grep -q '^# bench: needs a CUDA GPU' "$$f"; then \
			skipped="$$skipped $$f"; continue; \
		fi; \
		echo "== $$f"; \
		$(PY) "$$f" || exit $$?; \
	done; \
	if [ -n "$$skipped" ]; then echo "skipped (they need a CUDA GPU):$$skipped"; fi

# The pictures docs/ and the README show (docs/img/): the placed Qwen3-Next graph, the predicted
# sweep with the measured points, the per-GPU timeline. Byte-identical from run to run.
# Fails (one line) when the measured tables it draws are missing.
figures: setup
	$(PY) bench/figures.py

clean:
	rm -rf .venv .pytest_cache .hypothesis .ruff_cache build dist *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
