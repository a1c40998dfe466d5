"""Sparsity configs for `sparsify_`: small dataclasses, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("magnitude", "wanda")


def _check_method(cls, method):
    if method not in METHODS:
        raise ValueError(f"{cls}: method must be one of {METHODS}, got {method!r}")


@dataclass(frozen=True)
class SemiStructuredConfig:
    """2:4 along the input dim: keep the 2 highest-scoring of every 4 weights; the layer becomes a
    SparseLinear(format="2:4") running the 2:4 kernels (or dense, where that is faster)."""

    method: str = "magnitude"

    def __post_init__(self):
        _check_method("SemiStructuredConfig", self.method)


@dataclass(frozen=True)
class BlockSparseConfig:
    """Square blocks of `block_size` (16, 32, 64); keeps the (1 - sparsity) highest-scoring blocks of every
    block row (balanced rows: even work per output tile); the layer becomes SparseLinear(format="bsr")."""

    block_size: int = 32
    sparsity: float = 0.8
    method: str = "magnitude"

    def __post_init__(self):
        if self.block_size not in (16, 32, 64):
            raise ValueError(f"BlockSparseConfig: block_size must be 16, 32 or 64, got {self.block_size!r}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"BlockSparseConfig: sparsity must be in [0, 1), got {self.sparsity!r}")
        _check_method("BlockSparseConfig", self.method)


@dataclass(frozen=True)
class UnstructuredConfig:
    """Element-wise pruning: dense weights with a kept mask (zeros stay zero through training); no kernel
    promise. Wanda compares weights within each output row, magnitude within the whole layer."""

    sparsity: float = 0.5
    method: str = "magnitude"

    def __post_init__(self):
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"UnstructuredConfig: sparsity must be in [0, 1), got {self.sparsity!r}")
        _check_method("UnstructuredConfig", self.method)
