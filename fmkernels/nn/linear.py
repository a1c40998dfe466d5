from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["Linear", "is_dense_linear"]


class Linear(nn.Linear):
    """Drop-in for `torch.nn.Linear` (a subclass: same arguments, parameters and state_dict) whose forward is
    `fmkernels.linear`: fp32 CPU products on oneDNN's AVX-512 kernels where they measured faster than MKL.
    Being an nn.Linear, it is swapped like one by `fmkernels.quantize_`, LoRA and the sparsifiers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


def is_dense_linear(m: nn.Module) -> bool:
    """True for a plain dense linear layer (torch's nn.Linear or ours), not a quantized/sparse/LoRA subclass:
    what the compression and quantization passes may replace."""
    return type(m) in (nn.Linear, Linear)
