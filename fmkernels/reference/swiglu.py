"""SwiGLU, readable fp32 reference: silu(a) * b."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.silu(a.float()) * b.float()).to(a.dtype)
