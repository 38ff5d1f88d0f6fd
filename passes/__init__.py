"""Graph passes: merges, placement (layer, graph, per-region, custom), transfers, node counts, memory.

Passes are pure functions `Graph -> Graph`; analyses (node counts, memory plans) return frozen
results. `run_pipeline` runs a pipeline given as data and verifies after each pass; see
passes/README.md for the conventions (piece names, split state, merged weights).
"""

from passes.count import NodeCount, NodeEstimate, count_nodes, estimate_nodes, heuristic_budget
from passes.devices import PlacementError, parse_devices, parse_ts
from passes.manager import (PassContext, PassError, PipelineResult, PassReport, register_pass, registered,
                            resolve, run_pipeline)
from passes.gates import fuse_delta_net_gates
from passes.heads import contiguous_heads
from passes.memory import MemoryPlan, MemoryPlanError, check_fit, parse_mem, plan_memory
from passes.merge import merge_qkv, merge_siblings, merge_up_gate
from passes.place import place_graph, place_layer
from passes.shared_expert import fold_shared_expert
from passes.transfers import eliminate_dead, insert_transfers, verify_placed

DEFAULT_PASSES: tuple[str, ...] = ("merge_qkv", "merge_up_gate")

__all__ = [
    "DEFAULT_PASSES", "MemoryPlan", "MemoryPlanError", "NodeCount",
    "NodeEstimate", "PassContext", "PassError",
    "PassReport", "PipelineResult", "PlacementError", "check_fit", "contiguous_heads", "count_nodes", "eliminate_dead", "fuse_delta_net_gates",
    "estimate_nodes", "fold_shared_expert", "heuristic_budget", "insert_transfers", "merge_qkv", "merge_siblings", "merge_up_gate",
    "parse_devices",
    "parse_mem", "parse_ts", "place_graph", "place_layer", "plan_memory", "register_pass",
    "registered", "resolve", "run_pipeline", "verify_placed",
]
