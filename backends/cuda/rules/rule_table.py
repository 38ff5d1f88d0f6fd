"""The CUDA backend's rule table: the reference kernels (reference/kernels.py) overridden by the fast
forms of the plain ops (fastpath.py) and of the fused ops (fastpath_fused.py). A session on
CPU devices only runs the reference table."""

from __future__ import annotations

from typing import Mapping, Sequence

from backends.cuda.rules.fastpath import OVERRIDES
from backends.cuda.rules.fastpath_fused import FUSED
from backends.cuda.runtime.interp import Kernel
from backends.cuda.reference.kernels import KERNELS
from graphir.ops import Op

CUDA_KERNELS: dict[Op, Kernel] = {**KERNELS, **OVERRIDES, **FUSED}


def kernels_for(devices: Sequence[str]) -> Mapping[Op, Kernel]:
    """The rule table for a device list: the CUDA table when any device is a GPU."""
    return CUDA_KERNELS if any(d.startswith("cuda") for d in devices) else KERNELS
