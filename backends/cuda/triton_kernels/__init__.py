"""The Triton kernels of the CUDA fast paths (not named `triton`, which would shadow the package):
the small ops in one launch each (fused.py), the router and expert sum (moe_router.py), the
expert matmuls (fast_moe.py), single-row GEMV (gemv.py), the gated delta-net (deltanet.py) and
the timed choice of its prefill form (deltanet_prefill.py), split-K decode attention
(decode_attention.py). Each runs on CUDA tensors, or on the CPU under Triton's interpreter for
tests; the rule tables in `rules/` decide when, and fall back to `reference/` otherwise.
"""
