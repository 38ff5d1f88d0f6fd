"""transformers checkpoints in safetensors: one table per architecture maps names.

`TABLES[arch]` lists (HF name pattern, graph name pattern, transform); `{i}` is the layer.
Transforms: `neg_exp` (A_log -> ssm_a = -exp(A_log)), `squeeze1` (conv1d [C,1,K] -> [C,K]),
`experts.gate|up|down` (routed experts as [E,N,H] / [E,H,N], read from whichever layout the
file has: per-expert `experts.{j}.gate_proj.weight`, which `save_pretrained` of transformers
5.x writes, fused `experts.gate_up_proj` [E,2N,H] with `experts.down_proj` [E,H,N] as the
modules hold them, or fused `experts.gate_proj` / `experts.up_proj`; a fused tensor stored
transposed is recognised by its shape). Single files, several files, and sharded checkpoints
with `model.safetensors.index.json` all work; a directory without them (pickles, a config.json
alone, a missing shard) is refused with what it holds (`graphir.models.sources.weights_problem`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from backends.cuda.weights import mxfp4
from backends.cuda.weights.gguf_weights import unpermute_rope
from backends.cuda.weights.mla_weights import TRANSFORMS as MLA_TRANSFORMS, mla_weight
from backends.cuda.weights.sources import WeightError, WeightInfo
from graphir.models import ModelConfig
from graphir.models.sources import INDEX, ModelSource, weights_problem

Entry = tuple[str, str, str]  # (HF name pattern, graph name pattern, transform)

_TOP: list[Entry] = [
    ("model.embed_tokens.weight", "token_embd.weight", ""),
    ("model.norm.weight", "output_norm.weight", ""),
    ("lm_head.weight", "output.weight", ""),
]
_ATTN: list[Entry] = [("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "")] + [
    (f"model.layers.{{i}}.self_attn.{hf}_proj.{kind}", f"blk.{{i}}.attn_{g}.{kind}", "")
    for hf, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for kind in ("weight", "bias")
] + [
    ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", ""),
    ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", ""),
]
_FFN: list[Entry] = [(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"blk.{{i}}.ffn_{p}.weight", "")
                     for p in ("gate", "up", "down")]
_MOE: list[Entry] = [("model.layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight", "")] + [
    ("model.layers.{i}.mlp.experts", f"blk.{{i}}.ffn_{p}_exps.weight", f"experts.{p}") for p in ("gate", "up", "down")
] + [(f"model.layers.{{i}}.mlp.shared_expert.{p}_proj.weight", f"blk.{{i}}.ffn_{p}_shexp.weight", "")
     for p in ("gate", "up", "down")] + [
    ("model.layers.{i}.mlp.shared_expert_gate.weight", "blk.{i}.ffn_gate_inp_shexp.weight", ""),
]
_SSM: list[Entry] = [
    ("model.layers.{i}.linear_attn.in_proj_qkvz.weight", "blk.{i}.ssm_in.weight", ""),
    ("model.layers.{i}.linear_attn.in_proj_ba.weight", "blk.{i}.ssm_ba.weight", ""),
    ("model.layers.{i}.linear_attn.conv1d.weight", "blk.{i}.ssm_conv1d.weight", "squeeze1"),
    ("model.layers.{i}.linear_attn.dt_bias", "blk.{i}.ssm_dt.bias", ""),
    ("model.layers.{i}.linear_attn.A_log", "blk.{i}.ssm_a", "neg_exp"),
    ("model.layers.{i}.linear_attn.norm.weight", "blk.{i}.ssm_norm.weight", ""),
    ("model.layers.{i}.linear_attn.out_proj.weight", "blk.{i}.ssm_out.weight", ""),
]
# Qwen3.5: the delta-net's four separate input projections (the rest of _SSM as Qwen3-Next)
_SSM35: list[Entry] = [
    ("model.layers.{i}.linear_attn.in_proj_qkv.weight", "blk.{i}.attn_qkv.weight", ""),
    ("model.layers.{i}.linear_attn.in_proj_z.weight", "blk.{i}.attn_gate.weight", ""),
    ("model.layers.{i}.linear_attn.in_proj_b.weight", "blk.{i}.ssm_beta.weight", ""),
    ("model.layers.{i}.linear_attn.in_proj_a.weight", "blk.{i}.ssm_alpha.weight", ""),
] + _SSM[2:]
_POST_NORM: list[Entry] = [("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight", "")]
_FFN_NORM: list[Entry] = [("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "")]
_POST_NORM: list[Entry] = [
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight", "")]
# sigmoid routers: the selection bias sits in the router (GLM) or in the MoE block (MiniMax-M2)
_EXPERTS: list[Entry] = [_MOE[0]] + _MOE[1:4]
_GLM_MOE: list[Entry] = _EXPERTS + [
    ("model.layers.{i}.mlp.gate.e_score_correction_bias", "blk.{i}.exp_probs_b.bias", "")] + [
    (f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight", f"blk.{{i}}.ffn_{p}_shexp.weight", "")
    for p in ("gate", "up", "down")]
_MINIMAX_MOE: list[Entry] = [
    ("model.layers.{i}.block_sparse_moe.gate.weight", "blk.{i}.ffn_gate_inp.weight", ""),
    ("model.layers.{i}.block_sparse_moe.e_score_correction_bias", "blk.{i}.exp_probs_b.bias", "")] + [
    ("model.layers.{i}.block_sparse_moe.experts", f"blk.{{i}}.ffn_{p}_exps.weight", f"experts.{p}")
    for p in ("gate", "up", "down")]
_MLA: list[Entry] = [
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", ""),
    ("model.layers.{i}.self_attn.q_a_proj.weight", "blk.{i}.attn_q_a.weight", ""),
    ("model.layers.{i}.self_attn.q_a_layernorm.weight", "blk.{i}.attn_q_a_norm.weight", ""),
    ("model.layers.{i}.self_attn.q_b_proj.weight", "blk.{i}.attn_q_b.weight", "mla_q"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "mla_q"),
    ("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "blk.{i}.attn_kv_a_mqa.weight", "mla_kv_a"),
    ("model.layers.{i}.self_attn.kv_a_layernorm.weight", "blk.{i}.attn_kv_a_norm.weight", ""),
    ("model.layers.{i}.self_attn.kv_b_proj.weight", "blk.{i}.attn_k_b.weight", "mla_k_b"),
    ("model.layers.{i}.self_attn.kv_b_proj.weight", "blk.{i}.attn_v_b.weight", "mla_v_b"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", ""),
]
# per-expert tensor names where a family does not use {gate,up,down}_proj (Mixtral-style w1/w3/w2)
_EXPERT_PARTS: dict[str, dict[str, str]] = {"minimax_m2": {"gate": "w1", "up": "w3", "down": "w2"}}

# gpt-oss: experts fused as gate_up [E,H,2N] with gate and up interleaved (even / odd columns)
# and down [E,N,H], both stored [in,out] (or as MXFP4 `_blocks` + `_scales`, [out,in]); biases
# gate_up_proj_bias [E,2N] interleaved the same way
_OSS: list[Entry] = [
    ("model.layers.{i}.self_attn.sinks", "blk.{i}.attn_sinks.weight", ""),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight", ""),
    ("model.layers.{i}.mlp.router.weight", "blk.{i}.ffn_gate_inp.weight", ""),
    ("model.layers.{i}.mlp.router.bias", "blk.{i}.ffn_gate_inp.bias", ""),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "blk.{i}.ffn_gate_exps.weight", "oss.even"),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "blk.{i}.ffn_up_exps.weight", "oss.odd"),
    ("model.layers.{i}.mlp.experts.down_proj", "blk.{i}.ffn_down_exps.weight", "oss.all"),
    ("model.layers.{i}.mlp.experts.gate_up_proj_bias", "blk.{i}.ffn_gate_exps.bias", "oss.even"),
    ("model.layers.{i}.mlp.experts.gate_up_proj_bias", "blk.{i}.ffn_up_exps.bias", "oss.odd"),
    ("model.layers.{i}.mlp.experts.down_proj_bias", "blk.{i}.ffn_down_exps.bias", ""),
]

_GEMMA: list[Entry] = [
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight", ""),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight", ""),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight", ""),
]

TABLES: dict[str, list[Entry]] = {
    "llama": _TOP + _ATTN + _FFN + _FFN_NORM,
    "qwen3": _TOP + _ATTN + _FFN + _FFN_NORM,
    "qwen3_moe": _TOP + _ATTN + _FFN + _MOE + _FFN_NORM,
    "qwen3_next": _TOP + _ATTN + _FFN + _MOE + _SSM + _POST_NORM,
    "seed_oss": _TOP + _ATTN + _FFN + [  # llama.cpp names the pre-FFN norm attn_post_norm here
        ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.attn_post_norm.weight", "")],
    "ministral3": _TOP + _ATTN + _FFN + _FFN_NORM,
    "ernie4_5_moe": _TOP + _ATTN + _FFN + _FFN_NORM + _MOE[:4] + [
        (f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight", f"blk.{{i}}.ffn_{p}_shexp.weight", "")
        for p in ("gate", "up", "down")] + [
        ("model.layers.{i}.mlp.moe_statics.e_score_correction_bias", "blk.{i}.exp_probs_b.bias", "flat")],
    "glm4_moe": _TOP + _ATTN + _FFN + _GLM_MOE + _POST_NORM,
    "minimax_m2": _TOP + _ATTN + _MINIMAX_MOE + _FFN_NORM,
    "deepseek_v3": _TOP + _MLA + _FFN + _GLM_MOE + _FFN_NORM,
    "gpt_oss": _TOP + _ATTN + _OSS,
    "gemma3": _TOP + _ATTN + _FFN + _GEMMA,
    "qwen3_5": _TOP + _ATTN + _FFN + _SSM35 + _POST_NORM,
    "qwen3_5_moe": _TOP + _ATTN + _MOE + _SSM35 + _POST_NORM,
    "gemma4": _TOP + _ATTN + _FFN + _GEMMA + [("model.layers.{i}.layer_scalar", "blk.{i}.layer_output_scale.weight", "")],
}
TABLES["hunyuan_v1_moe"] = _TOP + [  # its own Q/K norm names first: the first matching rule wins
    ("model.layers.{i}.self_attn.query_layernorm.weight", "blk.{i}.attn_q_norm.weight", ""),
    ("model.layers.{i}.self_attn.key_layernorm.weight", "blk.{i}.attn_k_norm.weight", ""),
    ("model.layers.{i}.mlp.gate.wg.weight", "blk.{i}.ffn_gate_inp.weight", "")] + _ATTN + _FFN_NORM + _MOE[1:4] + [
    (f"model.layers.{{i}}.mlp.shared_mlp.{p}_proj.weight", f"blk.{{i}}.ffn_{p}_shexp.weight", "")
    for p in ("gate", "up", "down")]
# transformers keeps these families' RoPE pairs interleaved (GLM style): Q/K rows are permuted per
# head into the NeoX halves the graph rotates (the same permutation of q and k: scores unchanged)
INTERLEAVED_ROPE = frozenset({"ernie4_5_moe"})
_ROPED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")

# tensors a checkpoint may hold that no graph uses (multi-token-prediction heads, rope caches,
# the vision tower of a multimodal wrapper such as Qwen3.5's)
_IGNORED = re.compile(r"(^mtp\.|rotary_emb\.inv_freq$|^(model\.)?visual\.)")

_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "": lambda t: t,
    "neg_exp": lambda t: -torch.exp(t.to(torch.float32)),
    "squeeze1": lambda t: t.squeeze(1) if t.dim() == 3 and t.shape[1] == 1 else t,
    "flat": lambda t: t.reshape(-1),  # [1,E] -> [E]
}


def _layer_of(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _compile(table: list[Entry]) -> list[tuple[re.Pattern[str], str, str]]:
    out = []
    for hf, graph, tf in table:
        rx = re.escape(graph).replace(re.escape("{i}"), r"(?P<i>\d+)")
        out.append((re.compile(rx + "$"), hf, tf))
    return out


class HFCheckpoint:
    """Tensors of a transformers checkpoint directory, looked up by graph name."""

    def __init__(self, path: Path, cfg: ModelConfig) -> None:
        self.path, self.cfg = Path(path), cfg
        self.label = f"checkpoint {self.path.name}"
        self._handles: dict[Path, object] = {}
        # what the directory holds, in one line, before any file is opened: pickles, no
        # weights, missing shards or a damaged header are errors, never random weights
        why = weights_problem(ModelSource(cfg, "checkpoint", self.path))
        if why:
            raise WeightError(why)
        index = self.path / INDEX
        if index.is_file():
            wmap = json.loads(index.read_text()).get("weight_map", {})
            files = {k: self.path / v for k, v in wmap.items()}
        else:
            files = {}
            for f in sorted(self.path.glob("*.safetensors")):
                files.update({k: f for k in self._open(f).keys()})  # type: ignore[attr-defined]
        if not files:
            raise WeightError(f"{self.path}: no safetensors weights")
        self.files = files
        embd = [k for k in files if k.endswith("embed_tokens.weight")]
        # models wrapped by a multimodal parent keep the decoder under another prefix
        self.prefix = embd[0][: -len("embed_tokens.weight")] if embd else "model."
        self.rules = _compile(TABLES[cfg.arch])

    # ---- name resolution -------------------------------------------------------------------
    def _hf(self, pattern: str, i: str | None) -> str:
        name = pattern.replace("{i}", i or "")
        return self.prefix + name[len("model."):] if name.startswith("model.") else name

    def _rule(self, info: WeightInfo) -> tuple[str, str]:
        for rx, hf, tf in self.rules:
            m = rx.match(info.name)
            if m:
                return self._hf(hf, m.groupdict().get("i")), tf
        raise WeightError(f"{info.name}: no checkpoint name for this {self.cfg.arch} tensor")

    def _expert_plan(self, base: str, part: str, info: WeightInfo) -> tuple[str, list[str]]:
        E = info.shape[0]
        per_name = _EXPERT_PARTS.get(self.cfg.arch, {}).get(part, f"{part}_proj")
        per = [f"{base}.{j}.{per_name}.weight" for j in range(E)]
        if all(p in self.files for p in per):
            return "stack", per
        if part in ("gate", "up") and f"{base}.gate_up_proj" in self.files:
            return "gate_up", [f"{base}.gate_up_proj"]
        for name in (f"{base}.{part}_proj", f"{base}.{part}_proj.weight"):
            if name in self.files:
                return "fused", [name]
        missing = next(p for p in per if p not in self.files)
        raise WeightError(f"checkpoint lacks {missing} (or a fused {base}.{'gate_up' if part != 'down' else part}"
                          f"_proj) for {info.name}")

    def names_for(self, info: WeightInfo) -> list[str]:
        """The checkpoint tensors graph weight `info` is made of; WeightError when absent."""
        hf, tf = self._rule(info)
        if tf.startswith("oss.") and hf not in self.files and hf + "_blocks" in self.files:
            return [hf + "_blocks", hf + "_scales"]  # MXFP4, as published
        if tf.startswith("experts."):
            return self._expert_plan(hf, tf.split(".")[1], info)[1]
        if hf not in self.files:
            raise WeightError(f"checkpoint lacks {hf} (graph weight {info.name})")
        return [hf]

    def check(self, infos: Mapping[str, WeightInfo]) -> None:
        used: set[str] = set()
        for info in infos.values():
            used.update(self.names_for(info))
        for k in self.files:
            if k in used or _IGNORED.search(k) or (k == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            if self.cfg.arch in ("glm4_moe", "deepseek_v3") and _layer_of(k) >= self.cfg.n_layer:
                continue  # the multi-token-prediction layer, stored after the decoder's layers
            raise WeightError(f"checkpoint tensor {k} is not part of the model the config describes "
                              f"({self.cfg.arch}, {self.cfg.n_layer} layers)")

    # ---- reading -------------------------------------------------------------------------------
    def _open(self, f: Path) -> object:
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), "pt")
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise WeightError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:100]})") from None
        return self._handles[f]

    def _read(self, name: str) -> torch.Tensor:
        f = self.files[name]
        try:
            return self._open(f).get_tensor(name)  # type: ignore[attr-defined]
        except WeightError:
            raise
        except Exception as e:
            raise WeightError(f"{f}: cannot read tensor {name} ({str(e).splitlines()[0][:100]})") from None

    def _oss(self, info: WeightInfo, hf: str, tf: str) -> torch.Tensor:
        """A gpt-oss expert tensor as [E,out,in] (bias [E,out]): dequantised from MXFP4 or
        transposed from [E,in,out], then the gate (even) or up (odd) rows of a fused gate_up."""
        names = self.names_for(info)
        if len(names) == 2:
            t = mxfp4.dequantize(self._read(names[0]), self._read(names[1]))
        else:
            t = self._read(names[0])
            t = t.transpose(1, 2) if t.dim() == 3 else t
        t = {"even": t[:, 0::2], "odd": t[:, 1::2], "all": t}[tf.split(".")[1]]
        return self._shaped(t.contiguous(), info, names[0])

    def get(self, info: WeightInfo) -> torch.Tensor:
        hf, tf = self._rule(info)
        if tf.startswith("oss."):
            return self._oss(info, hf, tf)
        if not tf.startswith("experts."):
            (name,) = self.names_for(info)
            t = self._read(name)
            t = mla_weight(tf, t, self.cfg) if tf in MLA_TRANSFORMS else _TRANSFORMS[tf](t)
            t = self._shaped(t, info, name)
            if self.cfg.arch in INTERLEAVED_ROPE and info.name.endswith(_ROPED):
                t = unpermute_rope(t, self.cfg.n_head if ".attn_q." in info.name else self.cfg.n_kv_head)
            return t
        part = tf.split(".")[1]
        how, names = self._expert_plan(hf, part, info)
        if how == "stack":
            per = [self._shaped(self._read(n), WeightInfo(info.name, info.shape[1:]), n) for n in names]
            return torch.stack(per)  # [E,N,H] / [E,H,N]
        t = self._orient(self._read(names[0]), info, names[0], doubled=how == "gate_up")
        if how == "gate_up":
            n = t.shape[1] // 2
            return t[:, :n] if part == "gate" else t[:, n:]
        return t

    @staticmethod
    def _shaped(t: torch.Tensor, info: WeightInfo, name: str) -> torch.Tensor:
        if tuple(t.shape) != info.shape:
            raise WeightError(f"checkpoint tensor {name} has shape {list(t.shape)}, {info.name} needs "
                              f"{list(info.shape)} for this config")
        return t

    @staticmethod
    def _orient(t: torch.Tensor, info: WeightInfo, name: str, doubled: bool) -> torch.Tensor:
        """Fused experts are [E,out,in]; some writers store [E,in,out]: tell them apart by shape."""
        E, out, inp = info.shape
        want = (E, 2 * out if doubled else out, inp)
        if tuple(t.shape) == want:
            return t
        if tuple(t.shape) == (want[0], want[2], want[1]):
            return t.transpose(1, 2)
        raise WeightError(f"checkpoint tensor {name} has shape {list(t.shape)}, {info.name} needs {list(want)}")
