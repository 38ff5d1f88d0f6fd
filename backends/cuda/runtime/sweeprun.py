"""The llama-sweep-bench procedure (REFERENCE §5) on a Session.

For N_KV = 0, ub, 2·ub, … < ctx: TG single-token decodes at depth N_KV (timed -> T_TG; then
taken back: the cache length is reset and conv / delta-net state restored), then one batch
of PP tokens at depth N_KV (timed -> T_PP; kept, so the cache grows one u-batch per row).
Tokens are random, as sweep-bench's are. Each decode feeds its token and waits for the step
to finish, as llama_decode does; on CUDA the step is replayed from CUDA graphs captured once
per row over a cache bucket of round_up(N_KV + TG, 256) rows (decode_step.DecodeStep).
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch

from backends.cuda.capture.decode_step import DecodeStep
from graphir.ops import Op
from reports.sweep import SweepRow

BUCKET = 256


def _bucket(n: int, limit: int) -> int:
    return min(limit, -(-n // BUCKET) * BUCKET)


def _rows(session: Any) -> int:
    return min((b.shape[0] for b in session.buffers.values()), default=session.ctx)


def calibrate(session: Any, ubatch: int) -> dict[str, float]:
    """On CUDA, time the two delta-net prefill kernels once at this u-batch and keep the faster."""
    dn = [n for g in session.executed.values() for n in g.by_op(Op.DELTA_NET)]
    devs = [d for d in session.used_devices() if d.startswith("cuda")]
    if not dn or not devs or ubatch <= 64:
        return {}
    from backends.cuda.triton_kernels.deltanet_prefill import calibrate as time_prefill

    g = session.executed["pp"]
    q, v = g[dn[0].inputs[0]].spec.shape, g[dn[0].inputs[2]].spec.shape
    return time_prefill(torch.device(devs[0]), int(q[1]), int(v[1]), int(q[2]), int(v[2]), T=ubatch,
                        choices=session.choices)


def warm_up(session: Any, ubatch: int, tg: int, graphs: bool, gen: torch.Generator) -> None:
    """Compile kernels, create handles and grow the allocator's pools outside the timed region:
    the first row exactly as it will run (decode steps from graphs captured over its bucket,
    then a u-batch at depth 0), then a u-batch at depth > 0 (the other attention path and its
    first-use check). Leaves an empty sequence."""
    session.reset()
    limit = _rows(session)
    step = DecodeStep(session, _bucket(tg, limit), capture=None if graphs else False)
    for _ in range(min(tg, 16)):
        step.step(int(torch.randint(session.cfg.vocab_size, (1,), generator=gen)))
    session.streams.synchronize_all()
    step.close()
    del step
    session.reset()
    session.prefill(_tokens(session, ubatch, gen))
    if session.n_past + ubatch <= limit:
        session.prefill(_tokens(session, ubatch, gen))
    session.streams.synchronize_all()
    session.reset()


def _tokens(session: Any, n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(session.cfg.vocab_size, (n,), generator=gen).tolist()


def sweep(session: Any, *, ubatch: int, tg: int, ctx: int, split: str = "", graphs: bool = True, seed: int = 0,
          progress: Callable[[SweepRow], None] | None = None, warm: bool = True) -> list[SweepRow]:
    """Rows for N_KV = 0, ub, ... < ctx. `graphs=False` runs decode steps eagerly (no capture)."""
    if ubatch < 1 or tg < 1 or ctx < 1:
        raise ValueError(f"ubatch, tg and ctx must be positive, got {ubatch}, {tg}, {ctx}")
    gen = torch.Generator().manual_seed(seed)
    limit = _rows(session)
    if warm:
        warm_up(session, ubatch, tg, graphs, gen)
    session.reset()
    checked = session.check_specs
    session.check_specs = checked and not warm  # the warm-up ran the checks on these shapes
    collecting = gc.isenabled()
    gc.disable()  # no collection may land inside a timed decode step or u-batch
    try:
        sync = session.streams.synchronize_all
        out: list[SweepRow] = []
        for n_kv in range(0, ctx, ubatch):
            if n_kv + max(ubatch, tg) > limit:
                break
            gc.collect()  # here, not inside a timed region (a full collection of a large
            snap = session.snapshot()  # session's objects takes tens of milliseconds)
            step = DecodeStep(session, _bucket(n_kv + tg, limit), capture=None if graphs else False)
            toks = _tokens(session, tg, gen)
            sync()
            t0 = time.perf_counter()
            for t in toks:
                step.step(t)
                sync()  # as llama_decode: the token is done before the next is fed
            t_tg = time.perf_counter() - t0
            step.close()
            del step
            session.restore(snap)
            ids = _tokens(session, ubatch, gen)
            sync()
            t0 = time.perf_counter()
            session.prefill(ids)
            sync()
            t_pp = time.perf_counter() - t0
            row = SweepRow.from_times(ubatch, tg, n_kv, t_pp, t_tg, split)
            out.append(row)
            if progress is not None:
                progress(row)
    finally:
        session.check_specs = checked
        if collecting:
            gc.enable()
    return out
