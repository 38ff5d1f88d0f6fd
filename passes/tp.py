"""Tensor-parallel split of one layer region (REFERENCE §1), node by node.

Only leaves need a table: how each weight and state is cut (`WEIGHTS`, `STATES`). Every
compute node's behaviour follows from what its inputs are on each device:

- rep    the full value, computed on every device of the region (norms, router);
- split  a device's slice of a share along one dim (heads, intermediate columns);
- part   a partial sum of the full value (row-parallel matmul outputs and what is linear in them);
- lead   present on the region's lead device only (the output bias).

A matmul of rep activations with a row-sliced weight gives split activations; of split
activations with a column-sliced weight, a partial. Partials may be scaled by replicated
values, summed with each other or with the lead-only bias, and end at the region's exit, the
residual `add`: the lead device adds the residual, an `all_reduce` sums the partials (named as
the old node, so later layers read it unchanged). A device without a part of a share simply
has no piece of it ("absent"; a partial absent on a device counts as zero there).

Reshape sizes and slice bounds along the split dim scale with the device's fraction of the
share; this is exact because every such bound in the builders is a multiple of the share's
unit (heads, key heads, intermediate size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from graphir.graph import Node
from graphir.models.config import ModelConfig
from graphir.ops import Op

from passes.devices import PlacementError
from passes.emit import Emitter, suffix
from passes.plan import LAYER_ONLY, RegionPlan


@dataclass(frozen=True)
class Cut:
    kind: str  # rep | lead | slice | conv
    share: str = ""
    dim: int = 0


REP, LEAD = Cut("rep"), Cut("lead")
WEIGHTS: dict[str, Cut] = {
    "attn_norm.weight": REP, "ffn_norm.weight": REP, "post_attention_norm.weight": REP, "attn_post_norm.weight": REP,
    "attn_q.weight": Cut("slice", "heads", 0), "attn_q.bias": Cut("slice", "heads", 0),
    "attn_k.weight": Cut("slice", "heads", 0), "attn_k.bias": Cut("slice", "heads", 0),
    "attn_v.weight": Cut("slice", "heads", 0), "attn_v.bias": Cut("slice", "heads", 0),
    "attn_q_norm.weight": REP, "attn_k_norm.weight": REP,
    "attn_output.weight": Cut("slice", "heads", 1), "attn_output.bias": LEAD,
    "ssm_in.weight": Cut("slice", "kheads", 0), "ssm_ba.weight": Cut("slice", "kheads", 0),
    "ssm_conv1d.weight": Cut("conv", "kheads", 0), "ssm_dt.bias": Cut("slice", "kheads", 0),
    "ssm_a": Cut("slice", "kheads", 0), "ssm_norm.weight": REP, "ssm_out.weight": Cut("slice", "kheads", 1),
    # Qwen3.5's separate delta-net projections: attn_qkv rows are [q | k | v] of all heads, cut
    # like the conv channels; z, beta and alpha rows follow the value heads (grouped per key head)
    "attn_qkv.weight": Cut("conv", "kheads", 0), "attn_gate.weight": Cut("slice", "kheads", 0),
    "ssm_beta.weight": Cut("slice", "kheads", 0), "ssm_alpha.weight": Cut("slice", "kheads", 0),
    "ffn_gate.weight": Cut("slice", "ff", 0), "ffn_up.weight": Cut("slice", "ff", 0),
    "ffn_down.weight": Cut("slice", "ff", 1),
    "ffn_gate_inp.weight": REP, "ffn_gate_inp_shexp.weight": REP,
    "exp_probs_b.bias": REP,  # the selection bias of ERNIE's and the sigmoid routers: routing runs on every device
    "ffn_gate_exps.weight": Cut("slice", "exps", 1), "ffn_up_exps.weight": Cut("slice", "exps", 1),
    "ffn_down_exps.weight": Cut("slice", "exps", 2),
    "ffn_gate_shexp.weight": Cut("slice", "shexp", 0), "ffn_up_shexp.weight": Cut("slice", "shexp", 0),
    "ffn_down_shexp.weight": Cut("slice", "shexp", 1),
    # MLA (ik_llama.cpp's -sm graph for DEEPSEEK2): the latent projections and their norms whole on
    # every device (each writes its own copy of the latent cache), everything per head split
    "attn_q_a.weight": REP, "attn_q_a_norm.weight": REP, "attn_kv_a_mqa.weight": REP, "attn_kv_a_norm.weight": REP,
    "attn_q_b.weight": Cut("slice", "heads", 0), "attn_k_b.weight": Cut("slice", "heads", 0),
    "attn_v_b.weight": Cut("slice", "heads", 0),
    # gpt-oss: sinks follow their heads; the router bias is replicated like the router; the
    # experts' gate/up biases follow their columns, the down bias is added once (as wo's)
    "attn_sinks.weight": Cut("slice", "heads", 0), "ffn_gate_inp.bias": REP,
    "ffn_gate_exps.bias": Cut("slice", "exps", 1), "ffn_up_exps.bias": Cut("slice", "exps", 1),
    "ffn_down_exps.bias": LEAD,
    "post_ffw_norm.weight": REP,
}
# MiniMax-M2 norms q and k over all heads before taking them apart: ik_llama.cpp keeps wq and wk
# whole on every device, computes and norms the full q and k there, then each device takes its
# heads (a slice where they meet the split KV cache and attention); wv and wo split as usual
ARCH_WEIGHTS: dict[str, dict[str, Cut]] = {"minimax_m2": {"attn_q.weight": REP, "attn_k.weight": REP}}
NARROWED = (Op.KV_APPEND, Op.ATTENTION)  # ops where a whole value meets split heads: take the device's heads
STATES: dict[str, Cut] = {
    "cache_k": Cut("slice", "heads", 1), "cache_v": Cut("slice", "heads", 1),
    "ssm_state": Cut("slice", "kheads", 1), "conv_state": Cut("conv", "kheads", 1),
    "cache_kv": REP,  # MLA's latent cache: one row per token for all heads, a copy on every device
}
CONV_PARTS = ("q", "k", "v")

Kind = tuple[str, str, int]  # (rep|split|part|lead, share, dim)
_REP: Kind = ("rep", "", 0)


def conv_ranges(cfg: ModelConfig, a: int, b: int) -> tuple[tuple[int, int], ...]:
    """Conv channels of key heads [a,b): the q, k and v channel blocks are [q | k | v] in full."""
    nk, dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    rdv = (cfg.linear_num_value_heads // nk) * cfg.linear_value_head_dim
    return ((a * dk, b * dk), (nk * dk + a * dk, nk * dk + b * dk), (2 * nk * dk + a * rdv, 2 * nk * dk + b * rdv))


class RegionSplit:
    """Split the nodes of one region over the plan's devices into `em`."""

    def __init__(self, em: Emitter, plan: RegionPlan, layer: int, devices: Sequence[str], cfg: ModelConfig,
                 reduce_dtype: str | None) -> None:
        self.em, self.plan, self.cfg, self.devices = em, plan, cfg, tuple(devices)
        self.prefix = f"blk.{layer}."
        self.reduce_dtype = reduce_dtype
        self.kind: dict[str, Kind] = {}
        self.loc: dict[str, dict[int, str]] = {}  # region value -> device index -> local name
        self.pieces: dict[str, dict[int, list[tuple[str, int, int, str]]]] = {}  # state key -> pieces

    # ---- helpers ---------------------------------------------------------------------------
    def _fail(self, n: Node, why: str) -> PlacementError:
        return PlacementError(f"place_graph: cannot split %{n.name} ({n.op.value}): {why}")

    def _role(self, n: Node) -> str:
        return n.name[len(self.prefix):] if n.name.startswith(self.prefix) else n.name

    def _input(self, name: str, j: int) -> str | None:
        """The local name of an input on device j (None: absent there); outside values as is."""
        loc = self.loc.get(name)
        return name if loc is None else loc.get(j)

    def _frac(self, n: Node, share: str, j: int, x: int) -> int:
        s = self.plan.share(share)
        a, b = s.ranges[j]  # type: ignore[misc]
        if (x * (b - a)) % s.total:
            raise self._fail(n, f"{x} is not divisible into the {share} share {b - a}/{s.total}")
        return x * (b - a) // s.total

    def _range(self, n: Node, share: str, j: int, size: int) -> tuple[int, int]:
        s = self.plan.share(share)
        a, b = s.ranges[j]  # type: ignore[misc]
        if (a * size) % s.total or (b * size) % s.total:
            raise self._fail(n, f"size {size} does not split into {s.total} units")
        return a * size // s.total, b * size // s.total

    def _set(self, name: str, kind: Kind, loc: dict[int, str]) -> None:
        self.kind[name] = kind
        self.loc[name] = loc

    # ---- leaves ----------------------------------------------------------------------------
    def weight(self, n: Node) -> None:
        role = self._role(n)
        cut = ARCH_WEIGHTS.get(self.cfg.arch, {}).get(role, WEIGHTS.get(role))
        if cut is None:
            raise self._fail(n, "no split rule for this weight")
        if "src" in n.attr:
            raise self._fail(n, "the weight is already a slice")
        devs = self.plan.devices
        if cut.kind in ("rep", "lead"):
            which = devs if cut.kind == "rep" else (self.plan.lead,)
            loc = {j: self.em.leaf(suffix(n.name, j), Op.WEIGHT, n.spec, {"src": n.name}, self.devices[j])
                   for j in which}
            self._set(n.name, _REP if cut.kind == "rep" else ("lead", "", 0), loc)
            return
        loc = {j: self._cut_leaf(n, Op.WEIGHT, cut, j, n.name)[0] for j in self.plan.share(cut.share).devices}
        self._set(n.name, ("split", cut.share, cut.dim), loc)

    def state(self, n: Node) -> None:
        cut = STATES.get(self._role(n))
        if cut is None:
            raise self._fail(n, "no split rule for this state")
        key = str(n.attr["state"])
        loc, pieces = {}, {}
        if cut.kind == "rep":  # a whole copy per device, each its own state (kept equal: same inputs)
            for j in self.plan.devices:
                pieces[j] = [(suffix(key, j), 0, 0, "")]
                loc[j] = self.em.leaf(suffix(n.name, j), Op.STATE_IN, n.spec, {"state": suffix(key, j)},
                                      self.devices[j])
            self.pieces[key] = pieces
            return self._set(n.name, _REP, loc)
        for j in self.plan.share(cut.share).devices:
            loc[j], pieces[j] = self._cut_leaf(n, Op.STATE_IN, cut, j, key)
        self.pieces[key] = pieces
        self._set(n.name, ("split", cut.share, cut.dim), loc)

    def _cut_leaf(self, n: Node, op: Op, cut: Cut, j: int, src: str) -> tuple[str, list[tuple[str, int, int, str]]]:
        """One device's piece of a leaf (a slice, or for conv channels a concat of three) and,
        per slice, (its key, its range in the piece along the dim, its tag)."""
        dev, dim = self.devices[j], cut.dim
        if cut.kind == "slice":
            ranges = [self._range(n, cut.share, j, int(n.spec.shape[dim]))]
            tags = [""]
        else:
            a, b = self.plan.share(cut.share).ranges[j]  # type: ignore[misc]
            ranges, tags = list(conv_ranges(self.cfg, a, b)), list(CONV_PARTS)
        names: list[str] = []
        pieces: list[tuple[str, int, int, str]] = []
        pos = 0
        for (lo, hi), tag in zip(ranges, tags):
            base = f"{n.name}.{tag}" if tag else n.name
            key = f"{src}.{tag}" if tag else src
            attrs: dict[str, Any] = {"src": src, "slice_dim": dim, "start": lo, "stop": hi}
            if op == Op.STATE_IN:  # each piece is its own state, returned under the same key
                attrs["state"] = suffix(key, j)
            shape = n.spec.shape[:dim] + (hi - lo,) + n.spec.shape[dim + 1:]
            names.append(self.em.leaf(suffix(base, j), op, n.spec.with_shape(shape), attrs, dev))
            pieces.append((suffix(key, j), pos, pos + hi - lo, tag))
            pos += hi - lo
        if len(names) == 1:
            return names[0], pieces
        return self.em.emit(suffix(n.name, j), Op.CONCAT, names, {"dim": dim}, dev), pieces

    # ---- results of split state ----------------------------------------------------------
    def output(self, n: Node) -> None:
        (x,) = n.inputs
        kind = self.kind.get(x, _REP)
        key = str(n.attr["key"])
        if kind[0] == "rep" and key in self.pieces:  # a replicated state: every copy's next value
            for j, ((pkey, _, _, _),) in self.pieces[key].items():
                self.em.emit(suffix(n.name, j), Op.OUTPUT, [self.loc[x][j]], {"key": pkey}, self.devices[j])
            return
        if kind[0] != "split":
            if kind[0] != "rep":
                raise self._fail(n, "a graph result cannot be a partial sum")
            j = self.plan.lead
            self.em.emit(n.name, Op.OUTPUT, [self._input(x, j) or x], n.attrs, self.devices[j])
            return
        if key not in self.pieces:
            raise self._fail(n, f"result {key!r} is split but is no split state")
        for j, pcs in self.pieces[key].items():
            xj = self.loc[x][j]
            dev = self.devices[j]
            for pkey, lo, hi, tag in pcs:
                src = xj
                if len(pcs) > 1:
                    src = self.em.emit(suffix(f"{x}.{tag}", j), Op.SLICE, [xj],
                                       {"dim": kind[2], "start": lo, "stop": hi}, dev)
                name = suffix(f"{n.name}.{tag}" if tag else n.name, j)
                self.em.emit(name, Op.OUTPUT, [src], {"key": pkey}, dev)

    # ---- compute ---------------------------------------------------------------------------
    def compute(self, n: Node) -> None:
        kinds = [self.kind.get(i, ("out", "", 0)) for i in n.inputs]
        tags = [k[0] for k in kinds]
        if "part" in tags:
            self._partial(n, kinds)
        elif "split" in tags:
            self._split(n, kinds)
        elif "lead" in tags:
            raise self._fail(n, "reads a lead-only value outside a partial sum")
        else:
            loc = {j: self.em.emit(suffix(n.name, j), n.op, [self._input(i, j) or i for i in n.inputs],
                                   n.attrs, self.devices[j]) for j in self.plan.devices}
            self._set(n.name, _REP, loc)

    def _split(self, n: Node, kinds: list[Kind]) -> None:
        splits = [k for k in kinds if k[0] == "split"]
        share = splits[0][1]
        if any(k[1] != share for k in splits):
            raise self._fail(n, f"mixes shares {', '.join(sorted({k[1] for k in splits}))}")
        out_rank = n.spec.rank
        first = next(idx for idx, k in enumerate(kinds) if k[0] == "split")
        dim = kinds[first][2] + out_rank - len(self._spec(n.inputs[first]).shape)
        tag = "split"
        if n.op in (Op.MATMUL, Op.MOE_MATMUL):
            x, w = kinds[0], kinds[1]
            wdim_out, wdim_in = (0, 1) if n.op == Op.MATMUL else (1, 2)
            x_last = len(self._spec(n.inputs[0]).shape) - 1
            if x[0] != "split" and w[0] == "split" and w[2] == wdim_out:
                dim = out_rank - 1
            elif x[0] == "split" and x[2] == x_last and w[0] == "split" and w[2] == wdim_in:
                tag = "part"
            else:
                raise self._fail(n, "activation and weight cuts do not match")
        elif n.op == Op.RESHAPE:
            # builders keep tokens on dim 0 and heads (or head-major channels) on dim 1
            if kinds[0][2] != 1 or out_rank < 2:
                raise self._fail(n, "only reshapes that keep the split on dim 1 are supported")
            dim = 1
        elif n.op in (Op.ADD, Op.MUL):
            for i, k in zip(n.inputs, kinds):
                spec = self._spec(i)
                ax = dim - (out_rank - spec.rank)
                if k[0] != "split" and ax >= 0 and spec.shape[ax] != 1:
                    raise self._fail(n, f"replicated %{i} spans the split dim")
        elif n.op in (Op.RMS_NORM, Op.RMS_NORM_GATED) and dim == out_rank - 1:
            raise self._fail(n, "a norm over the split dim")
        elif n.op == Op.CONCAT and any(k[0] != "split" for k in kinds):
            raise self._fail(n, "concat of split and whole values")
        loc = {}
        for j in self.plan.share(share).devices:
            attrs = dict(n.attrs)
            if n.op == Op.RESHAPE:
                shape = list(attrs["shape"])
                shape[1] = self._frac(n, share, j, int(shape[1]))
                attrs["shape"] = tuple(shape)
            elif n.op == Op.SLICE and attrs["dim"] == dim:
                attrs["start"] = self._frac(n, share, j, int(attrs["start"]))
                attrs["stop"] = self._frac(n, share, j, int(attrs["stop"]))
            ins = [self._narrow(n, i, share, dim, j) if n.op in NARROWED and k[0] == "rep" else self._input(i, j)
                   for i, k in zip(n.inputs, kinds)]
            if any(i is None for i in ins):
                raise self._fail(n, f"an input has no piece on {self.devices[j]}")
            loc[j] = self.em.emit(suffix(n.name, j), n.op, ins, attrs, self.devices[j])  # type: ignore[arg-type]
        self._set(n.name, (tag, share if tag == "split" else "", dim), loc)

    def _narrow(self, n: Node, name: str, share: str, dim: int, j: int) -> str:
        """Device j's heads of a whole (replicated) value, as a slice along the split dim; a single
        head shared by all (MLA's latent keys and values) stays whole."""
        size = int(self._spec(name).shape[dim])
        if size == 1:
            return self._input(name, j) or name
        lo, hi = self._range(n, share, j, size)
        return self.em.emit(suffix(f"{name}.heads", j), Op.SLICE, [self._input(name, j) or name],
                            {"dim": dim, "start": lo, "stop": hi}, self.devices[j])

    def _spec(self, name: str) -> Any:
        return self.em.index[self.loc[name][next(iter(self.loc[name]))]].spec if name in self.loc \
            else self.em.index[name].spec

    def _partial(self, n: Node, kinds: list[Kind]) -> None:
        tags = [k[0] for k in kinds]
        devs = self.plan.devices
        loc: dict[int, str] = {}
        if n.op == Op.ADD and "out" in tags:
            return self._exit(n, tags)
        if n.op == Op.ADD:
            if "rep" in tags or "split" in tags:
                raise self._fail(n, "adds a whole or split value to a partial sum")
            for j in devs:
                a, b = (self._input(i, j) for i in n.inputs)
                if a and b:
                    loc[j] = self.em.emit(suffix(n.name, j), Op.ADD, [a, b], n.attrs, self.devices[j])
                elif a or b:
                    if "lead" in tags and tags[0 if a else 1] == "lead":
                        raise self._fail(n, "the lead-only bias has no partial to join")
                    loc[j] = a or b  # type: ignore[assignment]
        elif n.op == Op.ADD_ID and tags[:2] == ["part", "lead"] and tags[2] == "rep":
            # a bias added once to a partial sum: on the lead device (the others pass theirs on)
            if self._input(n.inputs[0], self.plan.lead) is None:
                raise self._fail(n, "the lead device holds no part of the sum to add the bias to")
            for j in devs:
                a = self._input(n.inputs[0], j)
                if a is not None:
                    loc[j] = a if j != self.plan.lead else self.em.emit(
                        suffix(n.name, j), Op.ADD_ID, [a, self._input(n.inputs[1], j), self._input(n.inputs[2], j)],
                        n.attrs, self.devices[j])
        elif n.op in (Op.MUL, Op.MOE_SUM, Op.RESHAPE, Op.CAST):
            if tags[0] != "part" or "part" in tags[1:] or any(t in ("lead", "split") for t in tags):
                raise self._fail(n, "not linear in the partial sum")
            for j in devs:
                ins = [self._input(i, j) for i in n.inputs]
                if ins[0] is not None:
                    loc[j] = self.em.emit(suffix(n.name, j), n.op, ins, n.attrs, self.devices[j])  # type: ignore[arg-type]
        else:
            raise self._fail(n, "not linear in the partial sum")
        self._set(n.name, ("part", "", 0), loc)

    def _exit(self, n: Node, tags: list[str]) -> None:
        """The residual add ending the region: residual on one device, then the all-reduce."""
        pi = tags.index("part")
        if tags.count("part") != 1 or tags.count("out") != 1:
            raise self._fail(n, "the region's residual add needs one partial and one outside value")
        p = n.inputs[pi]
        have = [j for j in self.plan.devices if self._input(p, j)]
        lead = self.plan.lead if self.plan.lead in have else have[0]
        if len(have) == 1:
            ins = list(n.inputs)
            ins[pi] = self._input(p, lead)  # type: ignore[call-overload]
            self.em.emit(n.name, Op.ADD, ins, n.attrs, self.devices[lead])
            self._set(n.name, _REP, {lead: n.name})
            return
        ins = list(n.inputs)
        ins[pi] = self._input(p, lead)  # type: ignore[call-overload]
        head = self.em.emit(suffix(n.name, lead), Op.ADD, ins, n.attrs, self.devices[lead])
        parts = [head if j == lead else self._input(p, j) for j in have]
        attrs = {"dtype": self.reduce_dtype} if self.reduce_dtype else {}
        group = ",".join(self.devices[j] for j in have)
        self.em.emit(n.name, Op.ALL_REDUCE, parts, attrs, group)  # type: ignore[arg-type]
        self._set(n.name, _REP, {j: n.name for j in have})

    def run(self, nodes: Sequence[Node]) -> None:
        if len(self.plan.devices) == 1 or self.cfg.arch in LAYER_ONLY:
            # nothing to split, or a family ik_llama.cpp never splits: the region runs whole on one device
            dev = self.devices[self.plan.devices[0] if len(self.plan.devices) == 1 else self.plan.lead]
            for n in nodes:
                self.em.add(n.with_(device=dev))
            return
        for n in nodes:
            if n.op == Op.WEIGHT:
                self.weight(n)
            elif n.op == Op.STATE_IN:
                self.state(n)
            elif n.op == Op.OUTPUT:
                self.output(n)
            elif n.op in (Op.INPUT, Op.COPY, Op.ALL_REDUCE):
                raise self._fail(n, "inputs, copies and collectives cannot sit inside a layer to split")
            else:
                self.compute(n)
