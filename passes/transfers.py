"""Turn any device assignment into a valid placed graph, and check placed graphs.

`insert_transfers` is what makes a custom placement a few lines: assign devices to some or
all nodes, and it fills the rest in and adds a `copy` wherever a node reads a value that does
not live on its device. Copies are named `<value>.copy#<device index>` (device index in the
graph's `devices` meta) and reused by every later reader on that device. A weight read on
another device is not copied at run time: it gets a replica leaf `<weight>#<device index>`
(attribute `src` = the weight), which the loader fills once.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from graphir.graph import Graph, GraphError, Node, verify
from graphir.ops import LEAVES, Op

from passes.devices import PlacementError
from passes.emit import base_name


def devices_of(g: Graph) -> tuple[str, ...]:
    """The device order that names pieces (`#j`): the `devices` meta if set, else first use."""
    meta = g.info.get("devices")
    if isinstance(meta, str) and meta:
        return tuple(meta.split(","))
    return g.device_list()


def _resolve(g: Graph, assignment: Mapping[str, str], default: str | None) -> dict[str, str]:
    """Device per node: assigned, else already set, else inherited: a compute node from its
    first placed compute input (else its first placed leaf, else `default`), then a leaf
    from its first reader."""
    dev: dict[str, str] = {}
    for n in g.nodes:
        d = assignment.get(n.name) or n.device
        if d is None and n.op not in LEAVES:
            ins = [i for i in n.inputs if i in dev]
            d = next((dev[i] for i in ins if g[i].op not in LEAVES), None) or \
                next((dev[i] for i in ins), None) or default
            if d is None:
                raise PlacementError(f"insert_transfers: %{n.name} has no device and no placed input to "
                                     f"inherit one from (give a default device)")
        if d is not None:
            dev[n.name] = d
    if len(dev) == len(g.nodes):
        return dev
    users = g.users
    for n in g.nodes:
        if n.name not in dev:
            d = next((dev[u] for u in users.get(n.name, ()) if u in dev), None) or default
            if d is None:
                raise PlacementError(f"insert_transfers: %{n.name} has no device and nothing to inherit one from")
            dev[n.name] = d
    return dev


def insert_transfers(g: Graph, assignment: Mapping[str, str] | None = None, default: str | None = None,
                     devices: Sequence[str] | None = None) -> Graph:
    """A placed graph: every node on a device, a copy before each cross-device read."""
    unknown = [k for k in (assignment or {}) if k not in g]
    if unknown:
        raise PlacementError(f"insert_transfers: assignment names unknown node %{unknown[0]}")
    dev = _resolve(g, assignment or {}, default)
    order = list(devices or devices_of(g))
    for n in g.nodes:
        for d in dev[n.name].split(","):
            if d not in order:
                order.append(d)
    index = {d: k for k, d in enumerate(order)}
    where: dict[str, tuple[str, ...]] = {}  # value -> devices it lives on
    root: dict[str, str] = {}  # copy -> the value it copies (no copy chains)
    copies: dict[tuple[str, str], str] = {}
    names = set(g.index)
    out: list[Node] = []
    for n in g.nodes:
        d = dev[n.name]
        if n.op == Op.COPY:
            src = root.get(n.inputs[0], n.inputs[0])
            root[n.name] = src
            copies.setdefault((src, d), n.name)
        inputs = list(n.inputs)
        if n.op not in (Op.COPY, Op.ALL_REDUCE):
            for k, i in enumerate(inputs):
                if d in where[i]:
                    continue
                src = root.get(i, i)
                if d in where[src]:
                    inputs[k] = src
                    continue
                c = copies.get((src, d))
                if c is None:
                    c = _transfer(g[src], d, index[d], names)
                    out.append(c)
                    where[c.name] = (d,)
                    root[c.name] = src
                    copies[(src, d)] = c.name
                inputs[k] = copies[(src, d)]
        node = n if (n.device == d and tuple(inputs) == n.inputs) else n.with_(device=d, inputs=tuple(inputs))
        out.append(node)
        where[n.name] = tuple(d.split(","))
    meta = dict(g.meta)
    meta["devices"] = ",".join(order)
    return Graph(tuple(out), tuple(meta.items()))


def _transfer(src: Node, d: str, k: int, names: set[str]) -> Node:
    """A copy onto device d; a weight is a constant, so it gets a replica leaf there instead
    (loaded once, not copied on every run): same source, same slice."""
    if src.op == Op.WEIGHT:
        attrs = dict(src.attrs)
        attrs.setdefault("src", src.name)
        return Node(_fresh(f"{src.name}#{k}", names), Op.WEIGHT, (), src.spec, tuple(attrs.items()), d)
    return Node(_fresh(f"{src.name}.copy#{k}", names), Op.COPY, (src.name,), src.spec, (), d)


def _fresh(name: str, names: set[str]) -> str:
    k, cand = 2, name
    while cand in names:
        base, tail = base_name(name)
        cand = f"{base}{k}{tail}"
        k += 1
    names.add(cand)
    return cand


def eliminate_dead(g: Graph) -> Graph:
    """Drop nodes no graph result depends on (replicated pieces nobody reads). Inputs stay:
    they are the graph's interface, fed whether read or not."""
    live: set[str] = set()
    for n in reversed(g.nodes):
        if n.op in (Op.OUTPUT, Op.INPUT) or n.name in live:
            live.add(n.name)
            live.update(n.inputs)
    if len(live) == len(g.nodes):
        return g
    return g.replace_nodes(n for n in g.nodes if n.name in live)


def verify_placed(g: Graph) -> None:
    """`verify` plus the placement contract: every node placed, no copy onto its own device,
    collectives over 2+ devices, sliced leaves consistent, split states tiling their source
    and each state piece returned under its own key."""
    verify(g)
    if not g.placed:
        missing = [n.name for n in g.nodes if not n.device]
        raise GraphError(f"%{missing[0]}: no device ({len(missing)} node(s) unplaced)")
    tiles: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    keys = {str(n.attr["key"]) for n in g.nodes if n.op == Op.OUTPUT}
    for n in g.nodes:
        if n.op == Op.COPY and g[n.inputs[0]].devices == n.devices:
            raise GraphError(f"%{n.name}: copy onto the device its input already lives on ({n.device})")
        if n.op == Op.ALL_REDUCE and len(set(n.devices)) < 2:
            raise GraphError(f"%{n.name}: all_reduce over fewer than 2 devices ({n.device})")
        if n.op in (Op.WEIGHT, Op.STATE_IN) and "slice_dim" in n.attr:
            a = n.attr
            dim, lo, hi = int(a["slice_dim"]), int(a["start"]), int(a["stop"])
            if not 0 <= dim < n.spec.rank or n.spec.shape[dim] != hi - lo or lo < 0:
                raise GraphError(f"%{n.name}: slice [{lo}:{hi}] on dim {dim} does not match its spec {n.spec}")
            if "src" not in a:
                raise GraphError(f"%{n.name}: a slice needs the name of its source (src)")
            if n.op == Op.STATE_IN:
                tiles.setdefault((str(a["src"]), dim), []).append((lo, hi, n.name))
        if n.op == Op.STATE_IN and str(n.attr["state"]) not in keys:
            raise GraphError(f"%{n.name}: state {n.attr['state']!r} has no result with that key")
    for (src, dim), parts in tiles.items():
        parts.sort()
        pos = 0
        for lo, hi, name in parts:
            if lo != pos:
                raise GraphError(f"%{name}: pieces of state {src!r} leave a gap or overlap at {pos} on dim {dim}")
            pos = hi
