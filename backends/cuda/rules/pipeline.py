"""The graphir-cuda engine's passes, run after placement on both phases' graphs: weight
merges, then the kernel fusions (passes/fuse.py). The executor runs the graph they make and
the cost model's graphir-cuda profile lists the same passes, so what is priced is what runs
(tests/passes/test_fusion_pipeline.py checks node for node)."""

from __future__ import annotations

from passes.fuse import FUSIONS

MERGES: tuple[str, ...] = ("fold_shared_expert", "merge_siblings", "merge_qkv", "merge_up_gate", "contiguous_heads",
                           "fuse_delta_net_gates")
ENGINE_PASSES: tuple[str, ...] = MERGES + FUSIONS
