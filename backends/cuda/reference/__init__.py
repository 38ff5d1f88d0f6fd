"""The reference kernels: `KERNELS` (kernels.py), one kernel per op, and the larger kernels it
calls (attention.py: RoPE, attention over the cache, kv_append; recurrent.py: the causal conv
and the gated delta rule; moe.py: router top-k, routing weights, expert matmuls and sum). They
are plain torch with transformers' rounding points, run on every device (`cpu`, `cpu:N`,
`cuda:N`), and define the numbers the fast paths are tested against.
"""
