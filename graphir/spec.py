"""Tensor specs: a shape of (possibly symbolic) dims and an element type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from graphir import dims as D
from graphir.dtypes import DType, dtype


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[D.Dim, ...]
    dtype: DType

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(D.dim(d) for d in self.shape))
        object.__setattr__(self, "dtype", dtype(self.dtype))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> D.Dim:
        return D.mul_dims(self.shape)

    def bind(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(D.bind(d, env) for d in self.shape)

    def numel_at(self, env: Mapping[str, int]) -> int:
        n = 1
        for d in self.bind(env):
            n *= d
        return n

    def nbytes_at(self, env: Mapping[str, int]) -> int:
        """Storage bytes with the symbols bound (quant types by whole rows of blocks)."""
        shape = self.bind(env)
        if not shape:
            return self.dtype.nbytes(1)
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return rows * self.dtype.nbytes(shape[-1])

    def with_shape(self, shape: tuple[D.Dim, ...]) -> "TensorSpec":
        return TensorSpec(tuple(shape), self.dtype)

    def with_dtype(self, dt: DType | str) -> "TensorSpec":
        return TensorSpec(self.shape, dtype(dt))

    def __str__(self) -> str:
        return f"{self.dtype.name}[{','.join(str(d) for d in self.shape)}]"


def spec(dt: DType | str, *shape: D.Dim) -> TensorSpec:
    return TensorSpec(tuple(shape), dtype(dt))
