"""Running a graph: the walk over the nodes (interp.py: `run_graph`, `ExecContext`), the `Session`
that holds weights and state across prefill and decode (session.py), one process per device on
torch.distributed (dist.py), device and type names (devices.py), one stream per GPU
(streams.py), the kernel choices of one session (choices.py), the llama-sweep-bench procedure
(sweeprun.py) and the memory checks made before anything is allocated (memcheck.py).
"""
