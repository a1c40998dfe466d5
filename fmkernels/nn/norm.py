from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import ops


__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Drop-in for `torch.nn.RMSNorm` backed by `fmkernels.rms_norm` (same arguments, state_dict and defaults).

    Normalizes over the trailing `normalized_shape` dims; eps=None means torch.finfo(x.dtype).eps, as in torch.
    """

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    @classmethod
    def from_torch(cls, m: nn.RMSNorm, backend: Optional[str] = None) -> "RMSNorm":
        new = cls(m.normalized_shape, m.eps, m.elementwise_affine, backend=backend)
        if m.weight is not None:
            new.weight = m.weight  # share the parameter: optimizers and state_dicts keep working
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.normalized_shape)
        if tuple(x.shape[-nd:]) != self.normalized_shape:
            raise ValueError(
                f"RMSNorm: input's trailing shape must be {self.normalized_shape}, got shape {tuple(x.shape)}"
            )
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if nd == 1:
            return ops.rms_norm(x, self.weight, eps, backend=self.backend)
        lead = x.shape[:-nd]
        w = self.weight.reshape(-1) if self.weight is not None else None
        return ops.rms_norm(x.reshape(*lead, -1), w, eps, backend=self.backend).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
