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
Hw = Annotated[str, typer.Option("--hw", help="system the cost model and --split auto price: 2x3090, 2xH200, "
                                 "3xH100, ... or a YAML file")]
Engine = Annotated[str, typer.Option("--engine", help="engine profile the cost model and --split auto price: "
                                     "ik_llama.cpp, graphir-cuda or a YAML file")]

HW_DEFAULT = DEFAULT_HW
ENGINE_DEFAULT = DEFAULT_ENGINE
RECURRENT_DEFAULT = "single"
