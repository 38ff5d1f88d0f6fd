"""The rule tables the executor runs and the passes that make the graph they run on: fastpath.py's
`OVERRIDES` (fast forms of the plain ops) and fastpath_fused.py's `FUSED` (fast forms of the
fused ops) laid over the reference `KERNELS` in rule_table.py (`CUDA_KERNELS`, `kernels_for`);
pipeline.py's `ENGINE_PASSES`, the merges and fusions applied after placement, which the cost
model's graphir-cuda profile lists too.
"""
