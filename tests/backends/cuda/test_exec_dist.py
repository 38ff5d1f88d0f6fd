"""Multi-process execution (one process per device, torch.distributed) gives the logits of
the single-process run of the same placed graph. Two ranks on the CPU with gloo; on a GPU
machine the same code runs under torchrun with NCCL (bench/bench_gpu.py checks it there)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket

import pytest
import torch

from backends.cuda.runtime.session import Session
from graphir.models import from_hf_dict
from passes import merge_qkv, merge_up_gate, place_graph, place_layer

DEVS = ("cpu:0", "cpu:1")
CFG = dict(vocab_size=50, hidden_size=32, intermediate_size=36, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, model_type="qwen3_next", num_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_key_heads=2,
           linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=3,
           full_attention_interval=2)
PROMPT = [5, 3, 9, 1, 1, 7, 2, 8]


def _transform(split: str):
    cfg = from_hf_dict(CFG)
    if split == "layer":
        return [lambda g: place_layer(g, cfg, DEVS), merge_qkv, merge_up_gate]
    return [lambda g: place_graph(g, cfg, DEVS, ts=(2, 1), recurrent="split"), merge_qkv, merge_up_gate]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, split: str, q: "mp.Queue") -> None:
    import torch.distributed as dist

    from backends.cuda.runtime.dist import RankSession, init_from_env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        r, _, local = init_from_env("gloo")
        s = RankSession(from_hf_dict(CFG), "random", DEVS, 64, rank=r, local_device=local, transform=_transform(split))
        a = s.prefill(PROMPT)
        b = s.decode([4, 6])
        q.put((rank, None if a is None else torch.cat([a, b]).numpy()))
        dist.destroy_process_group()
    except Exception as e:  # report instead of hanging the parent
        q.put((rank, repr(e)))


@pytest.mark.parametrize("split", ["layer", "graph"])
def test_two_ranks_equal_single_process(split: str) -> None:
    ref = Session(from_hf_dict(CFG), "random", DEVS, 64, transform=_transform(split))
    want = torch.cat([ref.prefill(PROMPT), ref.decode([4, 6])])
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, split, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [v for _, v in got if isinstance(v, str)]
    assert not errors, errors
    logits = [torch.from_numpy(v) for _, v in got if v is not None]
    assert len(logits) == 1  # only the head's rank returns logits
    assert torch.allclose(logits[0], want, rtol=1e-5, atol=1e-5)
