"""fmkernels.rms_norm: RMSNorm over the last dimension, forward and backward.

Schemas (defined once, here):
  fmkernels::rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)
  fmkernels::rms_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd, bool compute_dweight)
      -> (Tensor grad_x, Tensor grad_weight)
  x: (..., H) fp32/bf16/fp16; weight: (H,) or None; rstd: (...) fp32; grad_weight is empty when not computed.
Implemented by csrc/cpu/rms_norm.cpp (CPU key) and csrc/cuda/rms_norm.cu (CUDA key); the Triton kernels
register their own `fmkernels::rms_norm_*_triton` ops; the backward below is attached to both forwards
(fmkernels/_autograd.py); the reference is plain autograd PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _autograd, _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import rms_norm as ref

define("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)")
define(
    "rms_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd, bool compute_dweight) -> (Tensor, Tensor)"
)


@torch.library.register_fake("fmkernels::rms_norm_fwd")
def _fwd_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("fmkernels::rms_norm_bwd")
def _bwd_fake(grad_y, x, weight, rstd, compute_dweight):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if compute_dweight and weight is not None:
        return gx, torch.empty_like(weight)
    return gx, x.new_empty((0,))


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _make_backward(bwd):
    def backward(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        need_w = weight is not None and ctx.needs_input_grad[1]
        gx, gw = bwd(grad_y.contiguous(), x, weight, rstd, need_w)
        return gx, (gw if need_w else None), None

    return backward


BWD = _autograd.backward("rms_norm", _setup_context, _make_backward)  # one backward, every backend's forward
BWD.attach("fmkernels::rms_norm_fwd", torch.ops.fmkernels.rms_norm_bwd)


def _compiled(x, weight, eps):
    return torch.ops.fmkernels.rms_norm_fwd(x, weight, eps)[0]


def triton_module():
    """fmkernels/triton/rms_norm.py with this op's backward attached (imported on first use: triton is optional)."""
    from ..triton import rms_norm as tri

    BWD.attach(tri.rms_norm_fwd_triton, tri.rms_norm_bwd_triton)
    return tri


def _triton(x, weight, eps):
    return triton_module().rms_norm_triton(x, weight, eps)


OP = _dispatch.op("rms_norm")
OP.register(_dispatch.Backend("cuda", _compiled, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",)))
OP.register(_dispatch.Backend("triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
OP.register(_dispatch.Backend("cpu", _compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
OP.register(_dispatch.Backend("reference", ref.rms_norm, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))


__all__ = ["rms_norm"]


def rms_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6, *, backend: Optional[str] = None
) -> torch.Tensor:
    """RMSNorm over the last dimension: `x / sqrt(mean(x**2, -1) + eps) * weight`.

    x: (..., H) float32/bfloat16/float16 (any leading shape; non-contiguous is copied); weight: (H,) or None.
    Accumulates in fp32; returns x's dtype. Differentiable in x and weight.
    backend: "cpu" | "cuda" | "triton" | "reference" forces one (default: the fastest that fits; FMK_BACKEND).
    """
    op = "fmkernels.rms_norm"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, op=op)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"{op}: weight must have shape ({x.shape[-1]},) to match x.shape[-1], got {tuple(weight.shape)}"
            )
        check_same_device(op, x=x, weight=weight)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")
    q = _dispatch.Query(device=x.device.type, dtype=x.dtype, shape=(x.shape[-1],))
    impl = OP.select(q, backend)
    if not x.is_contiguous() and impl.name != "reference":
        x = x.contiguous()
    return impl.fn(x, weight, float(eps))
