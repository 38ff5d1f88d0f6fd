"""The options every placing verb shares, declared once (place, nodes, show, timeline,
predict, calibrate, eval, run). Each verb gives its own default where the verbs differ for
a reason (the devices a verb runs on); what the values mean is parsed once, by
`planner.placement.parse_placement`."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from planner.workload import DEFAULT_ENGINE, DEFAULT_HW

Split = Annotated[Optional[str], typer.Option(
    "--split", "-sm", help="layer | graph | auto (predict: a comma-separated list). Left out: layer "
    "(predict: layer,graph; eval, run: one device); with --pass, the passes place")]
Devices = Annotated[str, typer.Option("--devices", help="N | cpu | cpu,cpu (logical) | cuda:0,cuda:1")]
Ts = Annotated[Optional[str], typer.Option("--ts", "-ts", help="split ratios per device, e.g. 3,1")]
MaxGpu = Annotated[Optional[int], typer.Option("--max-gpu", help="graph split: devices per layer")]
Recurrent = Annotated[str, typer.Option("--recurrent", help="graph split of delta-net layers: single | split")]
UserPass = Annotated[Optional[List[str]], typer.Option(
    "--pass", help="module:function (repeatable): after --split's placement, or the placement itself")]
Passes = Annotated[Optional[str], typer.Option("--passes", help="registered passes after the placement, e.g. "
                                               "merge_qkv,merge_up_gate ('none': none)")]
Phase = Annotated[str, typer.Option("--phase", help="pp (T tokens) | tg (T=1)")]
Quant = Annotated[Optional[str], typer.Option(
    "--quant", help="file type (IQ4_XS, Q4_K_M, IQ4_KS), ggml type or FILE.gguf (its tensor types); default: the "
    "source's own (a GGUF's types; a preset: bf16)")]
KvType = Annotated[str, typer.Option("--kv-type", help="KV cache type (f16, q8_0, q6_0, ...)")]
Hw = Annotated[str, typer.Option("--hw", help="system the cost model and --split auto price: 2x3090, 2xH200, "
                                 "3xH100, ... or a YAML file")]
Engine = Annotated[str, typer.Option("--engine", help="engine profile the cost model and --split auto price: "
                                     "ik_llama.cpp, graphir-cuda or a YAML file")]

HW_DEFAULT = DEFAULT_HW
ENGINE_DEFAULT = DEFAULT_ENGINE
RECURRENT_DEFAULT = "single"
