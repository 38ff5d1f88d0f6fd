"""Multi-process execution: one process per device on torch.distributed (launched by torchrun).

Every rank builds and places the same graph, then executes only its own part: the nodes on
its device, with `copy` nodes turned into send (on the rank that holds the value) / recv (on
the rank that reads it) and `all_reduce` into `dist.all_reduce` over the group's ranks. All
ranks walk the one program order, so point-to-point messages between two ranks and the
collectives of a group are issued in the same order everywhere: no deadlock, no tags.
Rank r owns the graph's r-th device (`devices` meta order) and runs it on `local_device`
(cuda:LOCAL_RANK, or the CPU with the gloo backend), so the placed graph runs unchanged
across machines. Logits come back on the rank that holds the output head.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from backends.cuda.runtime.devices import torch_dtype
from backends.cuda.runtime.interp import ExecContext, ExecError, Replicas, RunStats, _check, _read
from backends.cuda.runtime.session import Session
from graphir.errors import GraphirError
from graphir.graph import Graph, Node, is_constant
from graphir.ops import Op


def init_from_env(backend: str | None = None) -> tuple[int, int, str]:
    """Join the process group torchrun describes: (rank, world size, local device name)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank, world_size=world)
    if use_cuda:
        torch.cuda.set_device(local)
    return rank, world, f"cuda:{local}" if use_cuda else "cpu"


class RankSession(Session):
    """`Session` for one rank. `devices` are the placed graph's device names (one per rank, in
    rank order); this rank runs `devices[rank]`'s nodes on `local_device`."""

    def __init__(self, model: Any, weights: Any = None, devices: Sequence[str] | str = "cuda:0,cuda:1", ctx: int = 4096,
                 *, rank: int, local_device: str, **kw: Any) -> None:
        self.rank, self.local = int(rank), local_device
        names = devices.split(",") if isinstance(devices, str) else list(devices)
        self.rank_of = {d: k for k, d in enumerate(names)}
        self.me = names[self.rank]
        self._groups: dict[tuple[int, ...], Any] = {}
        # placement sees the graph's device names; execution happens on local_device
        kw.setdefault("kernels", None)
        super().__init__(model, weights, _logical(names), ctx, **kw)

    # the full placed graphs are kept in self.graphs; the executed ones are this rank's part
    def _select(self, graphs: dict[str, Graph]) -> dict[str, Graph]:
        from backends.cuda.rules.rule_table import kernels_for

        self.kernels = kernels_for([self.local])
        out = {}
        for k, g in graphs.items():
            devs = g.info.get("devices")
            if isinstance(devs, str) and devs.split(",") != list(self.rank_of):
                raise GraphirError(f"the placed graph's devices {devs} are not the ranks' {','.join(self.rank_of)}")
            out[k] = self._local(g)
        for g in graphs.values():  # every rank creates every group, in the same order
            for n in g.by_op(Op.ALL_REDUCE):
                ranks = tuple(sorted(self.rank_of[d] for d in n.devices))
                if ranks not in self._groups:
                    ws = dist.get_world_size()
                    self._groups[ranks] = None if len(ranks) == ws else dist.new_group(list(ranks))
        return out

    def _local(self, g: Graph) -> Graph:
        """This rank's nodes, on the local device; copies it sends or receives, collectives it joins."""
        keep: list[Node] = []
        for n in g.nodes:
            if n.op == Op.COPY:
                if n.devices[0] == self.me or self._sender(g, n) == self.me:
                    keep.append(n)
            elif n.op == Op.ALL_REDUCE:
                if self.me in n.devices:
                    keep.append(n)
            elif n.devices and n.devices[0] == self.me:
                keep.append(n.with_(device=self.local))
        return Graph(tuple(keep), g.meta)

    def _sender(self, g: Graph, copy: Node) -> str:
        return g[copy.inputs[0]].devices[0]  # a replicated value is sent by its group's first device

    check_devices = False

    def used_devices(self) -> list[str]:
        return [self.local]

    def decode(self, ids: Any) -> torch.Tensor | None:
        from backends.cuda.runtime.session import _ids

        rows = [self._run("tg", [t]) for t in _ids(ids)]
        return None if rows[0] is None else torch.cat(rows, dim=0)

    def _device(self, n: Node) -> torch.device:
        return torch.device(self.local)

    def _run(self, phase: str, ids: list[int]) -> torch.Tensor | None:  # type: ignore[override]
        g = self.executed[phase]
        full = self.graphs[phase]
        if self.n_past + len(ids) > self.ctx:
            raise GraphirError(f"context of {self.ctx} tokens is full: {self.n_past} cached + {len(ids)} new")
        sym = {"T": len(ids), "KV": self.n_past}
        self.last_stats = RunStats()
        with self.streams:
            ctx = ExecContext(g, sym, self._feeds(g, ids, sym), self.weights, self.buffers, self.local,
                              choices=self.choices)
            res = self._walk(g, full, ctx)
            self._store(res)
        self.outputs = res
        self.n_past += len(ids)
        out = res.get("logits")
        return None if out is None else out.to(torch.float32)

    def _walk(self, g: Graph, full: Graph, ctx: ExecContext) -> dict[str, Any]:
        env: dict[str, Any] = {}
        results: dict[str, Any] = {}
        last = g.last_use
        weights: set[str] = set()
        dev = torch.device(self.local)
        for pos, n in enumerate(g.nodes):
            if n.op == Op.COPY and n.devices[0] != self.me:  # this rank holds the value: send it
                dist.send(_one(env[n.inputs[0]], self.me).contiguous(), dst=self.rank_of[n.devices[0]])
                out = None
            elif n.op == Op.COPY:  # receive what another rank sends
                src = full[n.inputs[0]]
                out = torch.empty(ctx.shape(src), dtype=torch_dtype(src.spec.dtype), device=dev)
                dist.recv(out, src=self.rank_of[self._sender(full, n)])
            elif n.op == Op.ALL_REDUCE:
                mine = next(i for i in n.inputs if full[i].devices[0] == self.me)
                out_dt = torch_dtype(n.spec.dtype)
                wire = torch_dtype(n.attr["dtype"]) if "dtype" in n.attr else out_dt
                t = env[mine].to(wire).contiguous().clone()
                dist.all_reduce(t, group=self._groups[tuple(sorted(self.rank_of[d] for d in n.devices))])
                out = t.to(out_dt)
            else:
                args = [_read(env[i], n) if i in env else None for i in n.inputs]
                try:
                    out = self.kernels[n.op](n, args, ctx)
                except Exception as e:
                    raise ExecError(f"rank {self.rank}: %{n.name} ({n.op.value}): {type(e).__name__}: {e}") from e
                if is_constant(n, weights):
                    weights.add(n.name)
                _check(n, out, ctx, n.name in weights)
                if n.op == Op.OUTPUT:
                    results[n.attr["key"]] = out
            if out is not None:
                env[n.name] = out
            for i in dict.fromkeys(n.inputs):
                if last.get(i) == pos:
                    env.pop(i, None)
            if n.name not in last:
                env.pop(n.name, None)
        return results


def _one(v: Any, me: str) -> torch.Tensor:
    return v.on(me) if isinstance(v, Replicas) else v


def _logical(names: Sequence[str]) -> tuple[str, ...]:
    """Device names that parse here whatever this machine has: placement only reads the names."""
    return tuple(names)
