"""One stream per GPU, entered together: `with streams:` makes each device's stream current.

PyTorch's streams do not synchronise with the default stream, so entering makes each of ours
wait for the work already queued on the caller's current stream, and leaving makes the
caller's stream wait for ours (events, no host wait): tensors flow safely in and out.

Every kernel then launches asynchronously on the stream of the device its tensors live on;
a cross-device copy is ordered by events between the two streams (PyTorch's device-to-device
copy), an all-reduce by NCCL on the same streams. The host never waits between nodes. On
logical CPU devices this is a no-op.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterable

import torch

from backends.cuda.runtime.devices import torch_device


class DeviceStreams:
    def __init__(self, devices: Iterable[str]) -> None:
        devs = dict.fromkeys(torch_device(d) for d in devices)
        self.streams: dict[torch.device, Any] = {d: torch.cuda.Stream(d) for d in devs if d.type == "cuda"}
        self._stack: list[ExitStack] = []

    def __enter__(self) -> "DeviceStreams":
        stack = ExitStack()
        callers = []
        for d, s in self.streams.items():
            caller = torch.cuda.current_stream(d)
            if caller != s:
                s.wait_stream(caller)
            callers.append((caller, s))
            stack.enter_context(torch.cuda.stream(s))
        self._stack.append((stack, callers))
        return self

    def __exit__(self, *exc: object) -> None:
        stack, callers = self._stack.pop()
        stack.close()
        for caller, s in callers:
            if caller != s:
                caller.wait_stream(s)

    def of(self, device: torch.device) -> Any:
        return self.streams.get(device)

    def synchronize_all(self) -> None:
        """Wait for every device (its default and our streams): timing boundaries, weight loads."""
        for d in self.streams:
            torch.cuda.synchronize(d)
