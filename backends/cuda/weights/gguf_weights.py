"""Weights from a GGUF file, dequantised with the `gguf` package.

Tensor names are the graph's (GGUF naming) unless the ModelSource maps them. GGUF stores
ggml's `ne` order (fastest dimension first): a tensor of ne [H, N] is the torch [N, H].
Two conventions of llama.cpp's converter are undone so that the graph's semantics hold:
- `llama`, `ministral3` (PERMUTED_QK): Q and K rows are permuted for ggml's interleaved RoPE; the graph uses the
  rotate_half pairing of transformers, so the permutation is inverted.
- `qwen3_next`, `qwen3_5*`, `gemma3`: zero-centred norm weights are stored with the 1 added; the
  graph's norms add it themselves (offset 1), so it is subtracted again.
- `qwen3_5*`: the delta-net's value heads are stored tiled (head p reads key head p % nk, so
  ggml can broadcast q and k with a plain repeat); the graph keeps transformers' grouped order
  (head h reads key head h // r), so the order is restored (`v_head_order`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from backends.cuda.quant.repack import WORDS, Packed, repack
from backends.cuda.weights.mla_weights import mla_from_gguf
from backends.cuda.weights.sources import WeightError, WeightInfo
from graphir.models import ModelConfig
from graphir.models.gguf_source import PERMUTED_QK


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation: rows [h, 2, d/2] were stored as [h, d/2, 2]."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's conversion of transformers Q/K rows (what a llama GGUF holds)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_ROPED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


def v_head_blocks(cfg: ModelConfig, name: str) -> tuple[int, int, int] | None:
    """(dim, offset, width) of the value-head blocks of a Qwen3.5 delta-net tensor, else None."""
    if cfg.arch not in ("qwen3_5", "qwen3_5_moe"):
        return None
    dv, qk = cfg.linear_value_head_dim, 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
    for suffix, where in ((".attn_qkv.weight", (0, qk, dv)), (".ssm_conv1d.weight", (0, qk, dv)),
                          (".attn_gate.weight", (0, 0, dv)), (".ssm_out.weight", (1, 0, dv)),
                          (".ssm_beta.weight", (0, 0, 1)), (".ssm_alpha.weight", (0, 0, 1)),
                          (".ssm_a", (0, 0, 1)), (".ssm_dt.bias", (0, 0, 1))):
        if name.endswith(suffix):
            return where
    return None


def v_head_order(w: torch.Tensor, cfg: ModelConfig, name: str, to_gguf: bool) -> torch.Tensor:
    """Value heads between transformers' grouped order (h = k·r + j) and llama.cpp's tiled one
    (p = j·nk + k): `to_gguf` as the converter stores them, else back. Other tensors pass."""
    where = v_head_blocks(cfg, name)
    if where is None:
        return w
    dim, off, width = where
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    tiled = torch.arange(nv).reshape(nk, nv // nk).T.reshape(-1)  # gguf[p] = hf[tiled[p]]
    perm = tiled if to_gguf else torch.argsort(tiled)
    head = w.narrow(dim, off, nv * width)
    shape = head.shape[:dim] + (nv, width) + head.shape[dim + 1:]
    moved = head.reshape(shape).index_select(dim, perm).reshape(head.shape)
    return torch.cat([w.narrow(dim, 0, off), moved, w.narrow(dim, off + nv * width, w.shape[dim] - off - nv * width)],
                     dim)


def _check_readable(path: Path) -> None:
    """GGUFReader raises on type ids the gguf package lacks (ik_llama.cpp's): say so in one line."""
    from gguf.constants import GGML_QUANT_SIZES

    from graphir.models.gguf_header import read_header

    known = {int(t) for t in GGML_QUANT_SIZES}
    foreign = sorted({t.dtype.name for t in read_header(path).tensors if t.dtype.ggml not in known})
    if foreign:
        raise WeightError(f"{path.name}: holds {', '.join(foreign)}, which the gguf package cannot dequantise; "
                          "graphir prices such files but cannot execute them")


class GGUFWeights:
    def __init__(self, path: Path, cfg: ModelConfig, name_map: Mapping[str, str] | None = None) -> None:
        from gguf import GGUFReader

        self.path, self.cfg = Path(path), cfg
        self.label = f"GGUF {self.path.name}"
        self.name_map = dict(name_map or {})
        _check_readable(self.path)
        self.reader = GGUFReader(str(self.path), "r")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def _gguf_name(self, info: WeightInfo) -> str:
        return self.name_map.get(info.name, info.name)

    def check(self, infos: Mapping[str, WeightInfo]) -> None:
        for info in infos.values():
            if self._gguf_name(info) not in self.tensors:
                raise WeightError(f"{self.path.name} lacks tensor {self._gguf_name(info)}")

    def get_kept(self, info: WeightInfo) -> Packed | None:
        """A 2-D tensor of a type with a repacked layout as its blocks (Session(keep_quant=True)),
        with the row permutations `get` undoes applied to whole rows; None for the rest (other
        types, other ranks, and transforms that need the values: those `get` dequantises)."""
        t = self.tensors.get(self._gguf_name(info))
        cfg = self.cfg
        if (t is None or t.tensor_type.name not in WORDS or len(t.shape) != 2 or cfg.arch == "deepseek_v3"
                or v_head_blocks(cfg, info.name) is not None or len(info.shape) != 2):
            return None
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(int(t.shape[1]), -1))  # a copy, as in get
        if cfg.arch in PERMUTED_QK and info.name.endswith(_ROPED):
            raw = unpermute_rope(raw, cfg.n_head if ".attn_q." in info.name else cfg.n_kv_head)
        p = repack(raw.contiguous(), t.tensor_type.name)
        if p.shape != info.shape:
            raise WeightError(f"GGUF tensor {info.name} has shape {list(p.shape)}, the config needs {list(info.shape)}")
        return p

    def get(self, info: WeightInfo) -> torch.Tensor:
        from gguf.quants import dequantize

        name = self._gguf_name(info)
        t = self.tensors.get(name)
        if t is None:
            raise WeightError(f"{self.path.name} lacks tensor {name}")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ne order -> torch order
        try:
            data = dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise WeightError(f"{name}: {e}") from None
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only
        cfg = self.cfg
        if cfg.arch == "deepseek_v3":
            w = mla_from_gguf(info, w, cfg)
        if tuple(w.shape) != info.shape:
            raise WeightError(f"GGUF tensor {name} has shape {list(w.shape)}, the config needs {list(info.shape)}")
        cfg = self.cfg
        if cfg.arch in PERMUTED_QK and info.name.endswith(_ROPED):
            heads = cfg.n_head if ".attn_q." in info.name else cfg.n_kv_head
            w = unpermute_rope(w, heads)
        if cfg.zero_centred_norms and info.norm_offset == 1.0:
            w = w - 1.0
        return v_head_order(w, cfg, info.name, to_gguf=False)
