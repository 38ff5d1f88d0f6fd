"""Rewrites a decode step makes at run time, found by pattern in the executed decode graph.

The graph stays what the passes made; `DecodeStep` (graphs.py) swaps a few kernels where the
pattern allows a cheaper launch sequence with the same values:

- `inplace_states`: a delta_net whose new state only goes back to the state it read: the
  token-serial kernel writes it over the old one (no 2 MB copy, no launch).
- `inplace_convs` / `conv_in_place`: ssm_conv(concat(state, x)) whose concat's rows [1:] only go
  back to that state: one kernel reads the state, shifts it in place and convolves.
- `add_norms`: a residual add read by an rms_norm: both in one kernel.
- `cast_norms`: a cast (f32 -> bf16) read only by a gated norm: the norm rounds as it loads.
- `topk_gates` / `topk_with_gate`: a moe_topk whose moe_weights also reads a shared-expert
  gate: the top-k kernel takes the gate and writes the weights too (one launch, not two).
- `swiglu_gemvs`: a swiglu read only by an expert GEMV: the GEMV applies it as it loads x.
- `moe_sum_adds`: a moe_sum read only by a residual add that add_norms pairs with a norm:
  sum, add and norm in one kernel.

This module finds the patterns (graph in, node names out) and rewrites the step's schedule
where a kernel reads other inputs; step_fusions.py holds the kernels that apply them.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.cuda import fused
from graphir.graph import Node
from graphir.ops import Op


def inplace_states(g: Any) -> dict[str, str]:
    """delta_net nodes whose new state only goes back to the state they read: {node: key}.
    The packed result's state rows must feed nothing but that state's output."""
    out: dict[str, str] = {}
    for n in g.by_op(Op.DELTA_NET):
        src = g[n.inputs[5]]
        if src.op != Op.STATE_IN or g.users.get(src.name) != (n.name,):
            continue  # another reader would see the state after the kernel overwrote it
        key = str(src.attr["state"])
        users = [g[u] for u in g.users.get(n.name, ())]
        rows = int(g[n.inputs[0]].spec.shape[0])  # T = 1 in a decode graph
        state_reads = [u for u in users if not (u.op == Op.SLICE and u.attr["dim"] == 0 and u.attr["stop"] == rows)]
        if (len(state_reads) == 1 and state_reads[0].op == Op.SLICE and state_reads[0].attr["start"] == rows
                and [g[x].op for x in g.users.get(state_reads[0].name, ())] == [Op.OUTPUT]
                and g[g.users[state_reads[0].name][0]].attr["key"] == key):
            out[n.name] = key
    return out


def only_reader(g: Any, n: Node, op: Op, arg: int | None = None) -> Node | None:
    """The single node reading n, when it is an `op` on n's device (reading n as input `arg`)."""
    users = g.users.get(n.name, ())
    if len(users) != 1:
        return None
    u = g[users[0]]
    if u.op != op or u.device != n.device or (arg is not None and (u.inputs[arg] != n.name
                                                                   or u.inputs.count(n.name) != 1)):
        return None
    return u


def topk_gates(g: Any) -> dict[str, tuple[str, str]]:
    """moe_topk nodes whose (norm) moe_weights reads the same logits and a shared gate:
    {topk: (weights node, gate value)}."""
    out: dict[str, tuple[str, str]] = {}
    for n in g.by_op(Op.MOE_TOPK):
        m = int(n.attr.get("shared", 0))
        for u in g.users.get(n.name, ()):
            w = g[u]
            if (w.op == Op.MOE_WEIGHTS and m and w.attr.get("norm") and int(w.attr.get("shared", 0)) == m
                    and len(w.inputs) == 3 and w.inputs[:2] == (n.inputs[0], n.name) and w.device == n.device):
                out[n.name] = (w.name, w.inputs[2])
    return out


def topk_with_gate(schedule: list[tuple], pairs: dict[str, tuple[str, str]]) -> tuple[list[tuple], set[str]]:
    """The schedule with each such top-k reading (logits, gate), where the gate is made earlier
    in the same segment; and the top-k nodes rewritten."""
    seg_of: dict[str, int] = {}
    done: set[str] = set()
    out: list[tuple] = []
    for k, item in enumerate(schedule):
        if item[0] != "seg":
            out.append(item)
            continue
        nodes = []
        for n in item[2]:
            got = pairs.get(n.name)
            if got is not None and seg_of.get(got[1]) == k:
                n = n.with_(inputs=(n.inputs[0], got[1]))
                done.add(n.name)
            seg_of[n.name] = k
            nodes.append(n)
        out.append(("seg", item[1], nodes))
    return out, done


def swiglu_gemvs(g: Any) -> set[str]:
    """swiglu nodes read only by a moe_matmul, as its x."""
    return {n.name for n in g.by_op(Op.SWIGLU) if only_reader(g, n, Op.MOE_MATMUL, 0) is not None}


def moe_sum_adds(g: Any, adds: dict[str, Node]) -> set[str]:
    """moe_sum nodes read only by a residual add that `adds` (add_norms) pairs with a norm."""
    out: set[str] = set()
    for n in g.by_op(Op.MOE_SUM):
        u = only_reader(g, n, Op.ADD)
        if u is not None and u.name in adds and u.inputs.count(n.name) == 1:
            out.add(n.name)
    return out


def cast_norms(g: Any) -> set[str]:
    """Casts to a narrower float read only by an rms_norm_gated, as its x."""
    out: set[str] = set()
    for n in g.by_op(Op.CAST):
        norm = only_reader(g, n, Op.RMS_NORM_GATED, 0)
        if (norm is not None and n.inputs[0] not in norm.inputs[1:] and g[n.inputs[0]].spec.dtype.name == "f32"
                and n.spec.dtype.name in ("bf16", "f16")):
            out.add(n.name)
    return out


def add_norms(g: Any) -> dict[str, Node]:
    """Residual adds read by an rms_norm of a weight on the same device: {add: norm}."""
    out: dict[str, Node] = {}
    for n in g.by_op(Op.ADD):
        for u in g.users.get(n.name, ()):
            m = g[u]
            if (m.op == Op.RMS_NORM and m.inputs[0] == n.name and m.device == n.device
                    and g[m.inputs[1]].op == Op.WEIGHT and n.spec == m.spec):
                out[n.name] = m
                break
    return out


def inplace_convs(g: Any, state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str, set[str]]]:
    """Decode convs whose state can shift in place: ssm_conv(concat(S, x)) where S is a state
    read by that concat alone and the concat's rows [1:] go only to S's output.
    {conv node: (state node, x node, the nodes the in-place kernel makes unnecessary)}."""
    out: dict[str, tuple[str, str, set[str]]] = {}
    for n in g.by_op(Op.SSM_CONV):
        if not fused.usable_device(n.devices[0] if n.device else str(next(iter(state.values()), torch.empty(0)).device)):
            continue
        cat = g[n.inputs[0]]
        w = g[n.inputs[1]]
        if cat.op != Op.CONCAT or cat.attr["dim"] != 0 or len(cat.inputs) != 2 or not 2 <= w.spec.shape[1] <= 4:
            continue
        src, x = g[cat.inputs[0]], g[cat.inputs[1]]
        if src.op != Op.STATE_IN or g.users.get(src.name) != (cat.name,) or x.spec.shape[0] != 1:
            continue
        key = str(src.attr["state"])
        others = [g[u] for u in g.users.get(cat.name, ()) if u != n.name]
        if (key not in state or src.spec.dtype != x.spec.dtype or len(others) != 1 or others[0].op != Op.SLICE
                or others[0].attr["start"] != 1 or [g[u].op for u in g.users.get(others[0].name, ())] != [Op.OUTPUT]):
            continue
        outp = g[g.users[others[0].name][0]]
        if outp.attr["key"] != key:
            continue
        out[n.name] = (src.name, x.name, {cat.name, others[0].name, outp.name})
    return out


def conv_in_place(schedule: list[tuple], g: Any, convs: dict[str, tuple[str, str, set[str]]]) -> list[tuple]:
    """The schedule with each such conv reading (state, x, w) and its concat, state slice and
    state output gone."""
    gone = set().union(*(d for _, _, d in convs.values()))
    out: list[tuple] = []
    for item in schedule:
        if item[0] != "seg":
            out.append(item)
            continue
        nodes = []
        for n in item[2]:
            if n.name in gone:
                continue
            if n.name in convs:
                src, x, _ = convs[n.name]
                n = n.with_(inputs=(src, x, n.inputs[1]))
            nodes.append(n)
        out.append(("seg", item[1], nodes))
    return out
