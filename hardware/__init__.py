"""Hardware profiles: GPUs, links and systems (hardware/profiles.py, data/*.yaml). The one
table of what a GPU is (rates, memory, power) for the cost model, the search and `--mem`."""
