"""Shared pieces of the passes tests: tiny random configs, random placements, the executor.

No tests here; the strategies keep models tiny (hidden <= 64, <= 4 layers) so that a random
placement builds, places and executes in milliseconds on logical CPU devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from graphir.graph import Graph
from graphir.models import BuildOptions, ModelConfig, build
from graphir.quant import uniform
from passes import PassContext, run_pipeline

ARCHES = ("llama", "qwen3", "qwen3_moe", "qwen3_next")
MERGES = ("merge_qkv", "merge_up_gate")


def session_class() -> Any:
    """The executor's Session, or None while backends/cuda has no session API."""
    try:
        from backends.cuda.runtime.session import Session
    except ImportError:
        return None
    return Session


@st.composite
def configs(draw: st.DrawFn, arches: tuple[str, ...] = ARCHES) -> ModelConfig:
    arch = draw(st.sampled_from(arches))
    hkv, gqa, d = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.sampled_from([8, 16]))
    n_layer = draw(st.integers(1, 4))
    kw: dict[str, Any] = dict(
        arch=arch, name=f"tiny-{arch}", vocab_size=64, hidden_size=draw(st.sampled_from([32, 48, 64])),
        n_layer=n_layer, n_head=hkv * gqa, n_kv_head=hkv, head_dim=d,
        intermediate_size=draw(st.sampled_from([32, 48, 80, 96])),
        tie_word_embeddings=draw(st.booleans()), torch_dtype="float32",
        attention_bias=arch == "llama" and draw(st.booleans()))
    if arch in ("qwen3_moe", "qwen3_next"):
        e = draw(st.integers(2, 6))
        kw.update(n_expert=e, n_expert_used=draw(st.integers(1, e)),
                  moe_intermediate_size=draw(st.sampled_from([16, 32, 48])))
    if arch == "qwen3_moe":
        kw.update(decoder_sparse_step=draw(st.integers(1, 2)),
                  mlp_only_layers=tuple(i for i in range(n_layer) if draw(st.booleans()) and i % 3 == 0))
    if arch == "qwen3_next":
        nk = draw(st.integers(1, 4))
        kw.update(partial_rotary_factor=0.5, shared_expert_intermediate_size=draw(st.sampled_from([0, 16, 32])),
                  layer_types=tuple(draw(st.sampled_from(["linear_attention", "full_attention"]))
                                    for _ in range(n_layer)),
                  linear_num_key_heads=nk, linear_num_value_heads=nk * draw(st.integers(1, 2)),
                  linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)
    return ModelConfig(**kw)


@dataclass(frozen=True)
class Placement:
    split: str | None  # None (unplaced), layer, graph
    devices: tuple[str, ...]
    ts: tuple[float, ...] | None
    max_gpu: int | None
    recurrent: str
    merges: tuple[str, ...]
    merge_first: bool
    reduce_dtype: str | None = None

    def pipeline(self) -> tuple[str, ...]:
        place = (f"place_{self.split}",) if self.split else ()
        return self.merges + place if self.merge_first else place + self.merges

    def context(self, cfg: ModelConfig) -> PassContext:
        return PassContext(cfg=cfg, devices=self.devices, ts=self.ts, max_gpu=self.max_gpu,
                           recurrent=self.recurrent, reduce_dtype=self.reduce_dtype)

    def estimate_kwargs(self) -> dict[str, Any]:
        return dict(merges=self.merges, split=self.split, devices=self.devices, ts=self.ts,
                    max_gpu=self.max_gpu, recurrent=self.recurrent)


@st.composite
def placements(draw: st.DrawFn, splits: tuple[str | None, ...] = (None, "layer", "graph")) -> Placement:
    split = draw(st.sampled_from(splits))
    n = 1 if split is None else draw(st.integers(1, 4))
    devices = tuple(f"cpu:{k}" for k in range(n))
    ts = None
    if draw(st.booleans()):
        ts = tuple(draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])) for _ in range(n))
        if sum(ts) == 0:
            ts = ts[:-1] + (1.0,)
    max_gpu = draw(st.sampled_from([None, 1, 2])) if split == "graph" else None
    if max_gpu is not None and max_gpu > n:
        max_gpu = None
    merges = tuple(m for m in MERGES if draw(st.booleans()))
    return Placement(split, devices, ts, max_gpu, draw(st.sampled_from(["single", "split"])), merges,
                     draw(st.booleans()), draw(st.sampled_from([None, "f32"])))


def tiny_opts(phase: str = "pp", quant: str = "f32") -> BuildOptions:
    return BuildOptions(phase=phase, quant=uniform(quant), kv_type="f32")  # type: ignore[arg-type]


def placed(cfg: ModelConfig, p: Placement, opts: BuildOptions | None = None) -> Graph:
    g = build(cfg, opts or tiny_opts())
    return run_pipeline(g, p.pipeline(), p.context(cfg)).graph


def attention_capacity_error(e: Exception) -> bool:
    """An explicit --max-gpu above what the KV heads allow is refused by design."""
    return "cannot split attention" in str(e)
