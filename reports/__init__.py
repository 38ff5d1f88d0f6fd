"""What graphir shows people: llama-sweep-bench tables (sweep.py; two compared: sweep_compare.py),
graph drawings (draw.py), progress bars (progress.py). Depends on the IR only, so every layer above may use it."""
