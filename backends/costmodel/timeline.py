"""Seconds from work: node costs (roofline + launch overhead), comm costs (alpha-beta per link and
algorithm) and the per-device timeline, all vectorised over KV depths.

Node:   t = launches * launch + max(flops / (peak * eff), bytes / (bw * mem_eff))
Copy:   t = (link latency + engine copy cost) + bytes / (link rate * comm_bw_eff)
Reduce: ring 2(p-1)a + 2(p-1)/p n/b; one-shot a + (p-1) n/b; gather-broadcast 2(a + (p-1) n/b),
        plus the engine's per-reduce cost.
Devices run their segments concurrently; a copy starts when its value is ready and its
destination is free; an all-reduce starts when every participant is free and ends for all of
them at once. The breakdown follows the critical path (the participant that arrived last).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backends.costmodel import mmid
from backends.costmodel.price import KINDS, Priced
from backends.costmodel.profiles import Engine, by_type as _by_type
from hardware.profiles import System
from graphir.dtypes import dtype

TERMS = ("compute", "weights", "kv", "activations", "comm", "launch")
_GEMM, _ATTN, _REC, _VEC = (KINDS.index(k) for k in ("gemm", "attn", "recurrent", "vector"))
_REDUCE_BYTES = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32}  # -grt: bytes per partial element


@dataclass(frozen=True)
class Span:
    """One node's interval on one device in a traced forward pass (seconds from its start)."""
    device: str
    start: float
    end: float
    node: str
    kind: str  # gemm | attn | recurrent | vector (compute, price.KINDS) or copy | allreduce


@dataclass(frozen=True)
class Timeline:
    total: np.ndarray  # [D] seconds per forward
    terms: np.ndarray  # [len(TERMS), D] seconds along the critical path (sums to total)
    busy: np.ndarray  # [P, D] seconds each device works (kernels and transfers)
    work: dict[str, np.ndarray]  # whole-graph sums per depth: flops, weight/kv/act bytes, comm bytes


def _per_node(table: dict[str, float], pr: Priced, default: float = 1.0) -> np.ndarray:
    """`_by_type` for every node's type (weight type of a matmul, KV type of an attention)."""
    per_type = {w: _by_type(table, w, default) for w in dict.fromkeys(pr.wdtype)}
    return np.array([per_type[w] for w in pr.wdtype])


def _rate_eff(pr: Priced, sysm: System, eng: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Peak FLOP/s and efficiency of every compute node."""
    gpu, N = sysm.gpu, len(pr.names)
    rate, eff = np.full(N, gpu.rate("fp32")), np.full(N, 0.5)
    m, n, k = pr.mnk
    small = pr.phase == "tg" or pr.tokens <= eng.mmv_max_tokens
    base = np.full(N, eng.gemm_eff)  # large-GEMM efficiency by weight type: MMQ or the float path
    for i in np.flatnonzero(pr.kind == _GEMM):
        dt = dtype(pr.wdtype[i])
        key = eng.quant_rate if dt.is_quant else eng.float_rates.get(dt.name, "fp32")
        rate[i] = gpu.rate(key)
        base[i] = (eng.gemm_eff * _by_type(eng.quant_gemm_eff, dt.name) if dt.is_quant
                   else eng.float_gemm_eff or eng.gemm_eff)
    # GEMMs: tiles of tokens x rows, each looping over the inner size; a matmul with few tokens
    # (per expert), few rows or a short inner loop fills its tiles poorly. Mat-vecs (decode) are
    # streaming kernels on the CUDA cores: their compute side is the decoding work per weight
    # (node_costs, gemv_ops), set here to the plain fp32 rate.
    mm = (pr.kind == _GEMM) & (m > eng.mmv_max_tokens)
    mv = (pr.kind == _GEMM) & ~mm
    k0 = eng.gemm_k0 if eng.gemm_k0 is not None else eng.gemm_tile0
    shape_eff = (m / (m + eng.gemm_m0)) * (n / (n + eng.gemm_tile0)) * (k / (k + k0))
    eff = np.where(mm, base * shape_eff, eff)
    rate = np.where(mv, gpu.rate("fp32"), rate)
    eff = np.where(mv, 1.0, eff)
    attn = pr.kind == _ATTN
    rate = np.where(attn, gpu.rate(eng.attn_tg_rate if small else eng.attn_pp_rate), rate)
    # a decode attention kernel has one query per head: its parallelism is heads x KV chunks,
    # so with few heads on a GPU (a head split) fewer blocks share the work per wave
    kv_eff = _per_node(eng.attn_tg_kv_eff, pr)
    tg_eff = eng.attn_tg_eff * kv_eff * n / (n + eng.attn_tg_h0)
    eff = np.where(attn, tg_eff if small else eng.attn_pp_eff, eff)
    rec = pr.kind == _REC
    rate = np.where(rec, gpu.rate(eng.recurrent_rate), rate)
    # the kernel's parallelism is value heads x value blocks while it walks the tokens (or
    # chunks) in order: with fewer heads on a GPU (a head split) each step keeps fewer SMs busy
    rec_eff = eng.recurrent_eff * n / np.maximum(n + eng.recurrent_h0, 1e-9)
    eff = np.where(rec, rec_eff, eff)
    return rate, eff


def _mat_vecs(pr: Priced, eng: Engine) -> np.ndarray:
    """Which nodes are mat-vecs streaming a weight (decode, or a few tokens)."""
    return (pr.kind == _GEMM) & (pr.mnk[0] <= eng.mmv_max_tokens) & (pr.wbytes > 0) & ~mmid.nodes(pr, eng)


def _gemv_flops(pr: Priced, eng: Engine, mv: np.ndarray) -> np.ndarray:
    """Mat-vec nodes: tokens x weights x the type's decoding work (gemv_ops, else 4); 0 elsewhere."""
    bits = {w: dtype(w).bits_per_weight for w in dict.fromkeys(pr.wdtype) if w}
    weights = np.array([pr.wbytes[i] * 8.0 / bits[w] if w else 0.0 for i, w in enumerate(pr.wdtype)])
    return np.where(mv, pr.mnk[0] * weights * _per_node(eng.gemv_ops, pr, 4.0), 0.0)


def _mem_eff(pr: Priced, eng: Engine) -> np.ndarray:
    return eng.mem_eff * _per_node(eng.quant_mem_eff, pr)


def _launches(pr: Priced, eng: Engine) -> np.ndarray:
    """Kernels per node as the engine runs it (its kernels-per-op table, else the op table's)."""
    table = {**eng.kernels, **(eng.decode_kernels if pr.phase == "tg" else {})}
    if not table:
        return pr.launches
    return np.array([table.get(op, l) for op, l in zip(pr.ops, pr.launches)], dtype=float)


def _replays(pr: Priced, eng: Engine) -> bool:
    """Whether this phase's kernels replay from CUDA graphs (else they are launched one by one)."""
    return eng.cuda_graphs == "always" or (eng.cuda_graphs == "tg" and pr.phase == "tg")


def node_costs(pr: Priced, sysm: System, eng: Engine, kv: np.ndarray,
               breakdown: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per node seconds [N, D] and the same split into TERMS [N, 6, D] (zeros [N, 6, 1] without
    `breakdown`: a fit needs the totals only)."""
    eng = eng.for_gpu(sysm.gpu)
    sysm = sysm.with_(gpu=eng.run_gpu(sysm.gpu))  # the clock the engine's kernels hold
    rate, eff = _rate_eff(pr, sysm, eng)
    bw = sysm.gpu.mem_bw_GBps * 1e9 * _mem_eff(pr, eng)
    x = pr.kv(kv)
    flops = pr.flops[0][:, None] + pr.flops[1][:, None] * x
    mv = _mat_vecs(pr, eng)
    flops = np.where(mv[:, None], _gemv_flops(pr, eng, mv)[:, None], flops)
    wb = pr.wbytes.copy()
    if eng.quant_dequant:  # expanding quantised weights to f16 writes and re-reads 2 bytes each
        gemm_q = np.array([bool(w) and dtype(w).is_quant for w in pr.wdtype]) & (pr.mnk[0] > eng.mmv_max_tokens)
        wb = wb + np.where(gemm_q, 4.0 * pr.mnk[1] * pr.mnk[2], 0.0)
    kvb = pr.kvbytes[0][:, None] + pr.kvbytes[1][:, None] * x
    act = pr.actbytes[0][:, None] + pr.actbytes[1][:, None] * x
    attn = (pr.kind == _ATTN)[:, None]
    if not eng.flash_attn:  # scores (flops / 4d of them) written f32 and read twice: 16 bytes each
        act = act + np.where(attn, 4.0 * flops / np.maximum(pr.mnk[2], 1.0)[:, None], 0.0)
    byt = wb[:, None] + kvb + act
    t_c = flops / (rate * eff)[:, None]
    ids = mmid.nodes(pr, eng)
    if ids.any():  # ik's expert matmuls: routing, tile slots and padded tiles (mmid.py)
        t_c = np.where(ids[:, None], mmid.compute_seconds(pr, sysm.gpu, eng, ids)[:, None], t_c)
    if eng.recurrent_step_us:  # a recurrent kernel takes at least one dependent step per token
        steps = np.where(pr.kind == _REC, pr.mnk[0] * eng.recurrent_step_us * 1e-6, 0.0)
        t_c = np.maximum(t_c, steps[:, None])
    t_m = byt / bw[:, None]
    per_launch = eng.graph_launch_us if _replays(pr, eng) else eng.launch_us
    launch = _launches(pr, eng) * np.where(pr.kind == _ATTN, 1.0 if eng.flash_attn else 4.0, 1.0) * per_launch * 1e-6
    if eng.stream_us or eng.gemv_us:  # a mat-vec's pipeline fill and last wave: µs of its own, not launches
        launch = launch + np.where(mv, _per_node(eng.gemv_us, pr, eng.stream_us) * 1e-6, 0.0)
    body = np.maximum(t_c, t_m)
    if not breakdown:
        return body + launch[:, None], np.zeros((len(pr.names), len(TERMS), 1))
    terms = np.zeros((len(pr.names), len(TERMS), len(kv)))
    comp = t_c >= t_m
    share = np.where(byt > 0, t_m / np.where(byt > 0, byt, 1.0), 0.0)
    terms[:, 0] = np.where(comp, t_c, 0.0)
    terms[:, 1] = np.where(comp, 0.0, share * wb[:, None])
    terms[:, 2] = np.where(comp, 0.0, share * kvb)
    terms[:, 3] = np.where(comp, 0.0, share * act)
    terms[:, 5] = launch[:, None]
    return body + launch[:, None], terms


def mask_seconds(pr: Priced, eng: Engine, kv: np.ndarray) -> np.ndarray:
    """[D] host seconds building the KQ mask before a forward pass at depths `kv`: tokens x
    cache rows in view (padded) elements, one thread below the engine's threading thresholds
    (a decode step), else `mask_threads`; the host does it before the GPU starts the pass."""
    if not eng.mask_ns or not (pr.kind == _ATTN).any():
        return np.zeros(len(kv))
    n_kv = np.ceil((kv + pr.tokens) / eng.kv_pad) * eng.kv_pad
    threads = np.where((pr.tokens >= eng.mask_min_tokens) & (n_kv >= eng.mask_min_kv), eng.mask_threads, 1)
    return pr.tokens * n_kv * eng.mask_ns * 1e-9 / threads


def copy_seconds(nbytes: float, sysm: System, eng: Engine) -> float:
    """The transfer part of one engine copy of `nbytes` to another device (without the engine's
    per-copy cost `copy_us`): without P2P an engine that does not pipeline the two staged hops
    pays both in series; an engine whose scheduler copies through host memory whatever the
    link (`copy_bw_eff` set) reaches a fraction of the bus rate, with or without P2P."""
    eng = eng.for_gpu(sysm.gpu)
    link = sysm.link
    hops = 2 if (not link.p2p and eng.staged_copy == "serial") else 1
    beta = link.beta * eng.comm_bw_eff if eng.copy_bw_eff is None else link.bw_GBps * 1e9 * eng.copy_bw_eff
    return hops * (link.latency_us * 1e-6 + nbytes / beta)


def comm_costs(pr: Priced, sysm: System, eng: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per comm node and its (transfer, engine overhead) parts, each [C]."""
    eng = eng.for_gpu(sysm.gpu)
    link = sysm.link
    a = link.latency_us * 1e-6
    beta = link.beta * eng.comm_bw_eff
    xfer, over = np.zeros(pr.n_comm), np.zeros(pr.n_comm)
    per_launch = eng.graph_launch_us if _replays(pr, eng) else eng.launch_us
    for c, kind in enumerate(pr.comm_kind):
        if kind == "copy":
            xfer[c] = copy_seconds(pr.comm_numel[c] * pr.comm_elem[c], sysm, eng)
            over[c] = eng.copy_us * 1e-6
            continue
        p, tok = len(pr.comm_group[c]), int(pr.comm_tokens[c])
        elem = pr.comm_elem[c] or (_REDUCE_BYTES[eng.reduce_type] if tok >= eng.reduce_f16_min_tokens else 4.0)
        nb = pr.comm_numel[c] * elem
        algo = eng.ar_algo(p, tok, link.p2p)
        if algo == "nccl":
            # NCCL's ring over its own transport (P2P, else host shared memory): its latency is
            # part of the call's fixed cost (allreduce_us), its rate the link's
            xfer[c] = 2 * (p - 1) / p * nb / beta
        elif algo == "ring":
            xfer[c] = 2 * (p - 1) * a + 2 * (p - 1) / p * nb / beta
        elif algo == "one_shot":
            xfer[c] = a + (p - 1) * nb / beta
        else:
            xfer[c] = 2 * (a + (p - 1) * nb / beta)
        extra = max(0.0, float(pr.comm_launches[c]) - 1.0) * per_launch
        over[c] = (eng.allreduce_us + extra) * 1e-6
    return xfer, over


def trace(pr: Priced, sysm: System, eng: Engine, kv: float) -> tuple[Span, ...]:
    """Every node's (device, start, end) in one forward pass at depth `kv`, in event order."""
    spans: list[Span] = []
    evaluate(pr, sysm, eng, np.array([float(kv)]), spans)
    return tuple(spans)


def evaluate(pr: Priced, sysm: System, eng: Engine, kv: np.ndarray, spans: list[Span] | None = None,
             breakdown: bool = True) -> Timeline:
    """The timeline of one forward pass at every depth in `kv` (tokens already cached); with
    `spans`, the walk also records each node's interval at the first depth (see `trace`)."""
    kv = np.asarray(kv, dtype=float)
    D, P = len(kv), len(pr.devices)
    if P > sysm.count:
        from hardware.profiles import ProfileError

        raise ProfileError(f"graph is placed on {P} devices but {sysm.name} has {sysm.count}")
    eng = eng.for_gpu(sysm.gpu)
    cost, terms = node_costs(pr, sysm, eng, kv, breakdown)
    if len(pr.seg_start):
        seg_t = np.add.reduceat(cost, pr.seg_start, axis=0)
        seg_terms = np.add.reduceat(terms, pr.seg_start, axis=0)
    else:
        seg_t, seg_terms = np.zeros((0, D)), np.zeros((0, len(TERMS), D))
    xfer, over = comm_costs(pr, sysm, eng)
    # the host thread that issues eager kernels for every device, in program order (host_us)
    issue = 0.0 if _replays(pr, eng) else eng.host_us * 1e-6
    seg_host = (np.add.reduceat(pr.host_nodes * issue, pr.seg_start) if len(pr.seg_start) and issue
                else np.zeros(len(pr.seg_start)))
    # each segment is also one launch of the engine's scheduler (a split's graph and its events)
    seg_host = seg_host + eng.segment_us * 1e-6
    issue = issue or eng.segment_us
    # one host thread for every GPU, or one per GPU (-sas): then each device has its own clock
    hosts = [np.zeros(D) for _ in range(P if eng.async_scheduler else 1)]
    t = [np.zeros(D) for _ in range(P)]
    bd = [np.zeros((len(TERMS), D)) for _ in range(P)]
    busy = np.zeros((P, D))
    snaps: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(D), np.zeros((len(TERMS), D)))] * pr.n_snaps
    zero = (np.zeros(D), np.zeros((len(TERMS), D)))
    for ev in pr.events:
        if ev.kind == "seg":
            d = ev.devices[0]
            if spans is not None:  # the segment's nodes run back to back on d
                lo = pr.seg_start[ev.index]
                hi = pr.seg_start[ev.index + 1] if ev.index + 1 < len(pr.seg_start) else len(pr.names)
                ends = t[d][0] + np.cumsum(cost[lo:hi, 0])
                spans += [Span(pr.devices[d], float(e - cost[i, 0]), float(e), pr.names[i], KINDS[pr.kind[i]])
                          for i, e in zip(range(lo, hi), ends)]
            end = t[d] + seg_t[ev.index]
            bd[d] = bd[d] + seg_terms[ev.index]
            if issue:  # the device ends no earlier than the host has issued the segment's last kernel
                h = d if eng.async_scheduler else 0
                hosts[h] = hosts[h] + seg_host[ev.index]
                wait = np.maximum(hosts[h] - end, 0.0)
                bd[d][5] = bd[d][5] + wait
                end = end + wait
            t[d] = end
            busy[d] += seg_t[ev.index]
            if ev.snap >= 0:
                snaps[ev.snap] = (t[d], bd[d])
            continue
        c = ev.index
        add = np.zeros((len(TERMS), 1))
        add[4, 0], add[5, 0] = xfer[c], over[c]
        cost_c = xfer[c] + over[c]
        if ev.kind == "copy":
            d = ev.devices[0]
            rt, rb = snaps[ev.src] if ev.src >= 0 else zero
            later = rt > t[d]
            start = np.where(later, rt, t[d])
            hist = np.where(later[None, :], rb, bd[d])
            t[d], bd[d] = start + cost_c, hist + add
            busy[d] += cost_c
            snaps[ev.snap] = (t[d], bd[d])
            if spans is not None:
                spans.append(Span(pr.devices[d], float(start[0]), float(t[d][0]), pr.comm_names[c], "copy"))
            continue
        group = ev.devices
        stack = np.stack([t[d] for d in group])
        last = np.argmax(stack, axis=0)
        start = stack.max(axis=0)
        hist = np.stack([bd[d] for d in group])[last, :, np.arange(D)].T
        for d in group:
            t[d], bd[d] = start + cost_c, hist + add
            busy[d] += cost_c
            if spans is not None:
                spans.append(Span(pr.devices[d], float(start[0]), float(t[d][0]), pr.comm_names[c], "allreduce"))
        snaps[ev.snap] = (start + cost_c, hist + add)
    ends = np.stack(t)
    last = np.argmax(ends, axis=0)
    host = eng.forward_us * 1e-6 + mask_seconds(pr, eng, kv)
    total = ends.max(axis=0) + host
    crit = np.stack(bd)[last, :, np.arange(D)].T
    crit[5] += host
    x = pr.kv(kv)
    work = {
        "flops": (pr.flops[0][:, None] + pr.flops[1][:, None] * x).sum(axis=0),
        "weight_bytes": np.full(D, pr.wbytes.sum()),
        "kv_bytes": (pr.kvbytes[0][:, None] + pr.kvbytes[1][:, None] * x).sum(axis=0),
        "act_bytes": (pr.actbytes[0][:, None] + pr.actbytes[1][:, None] * x).sum(axis=0),
        "comm_bytes": np.full(D, float((pr.comm_numel * np.where(pr.comm_elem > 0, pr.comm_elem, 4.0)).sum())),
    }
    return Timeline(total, crit, busy, work)
