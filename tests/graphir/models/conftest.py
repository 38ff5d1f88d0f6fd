"""The model front ends' tests run tiny transformers models: one intra-op thread each
(helpers.hf_oracle.torch_threads says why)."""

from __future__ import annotations

from typing import Iterator

import pytest

from helpers.hf_oracle import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield
