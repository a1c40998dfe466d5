"""fmkernels.swiglu: silu(a) * b, forward and backward each in one pass.

Schemas (defined once, here):
  fmkernels::swiglu_fwd(Tensor a, Tensor b) -> Tensor y                     a, b, y: (..., F)
  fmkernels::swiglu_bwd(Tensor grad_y, Tensor a, Tensor b) -> Tensor grad_ab  (..., 2F) = [grad_a | grad_b]
a and b may be strided views (unit last stride), e.g. the two halves of one (..., 2F) gate/up projection:
`swiglu(ab)` takes that packed tensor and its backward returns the packed gradient with no concatenation.
Implemented by csrc/cpu/swiglu.cpp (CPU key) and csrc/cuda/swiglu.cu (CUDA key); Triton: fmkernels/triton/swiglu.py; reference: reference/swiglu.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _autograd, _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import swiglu as ref

define("swiglu_fwd(Tensor a, Tensor b) -> Tensor")
define("swiglu_bwd(Tensor grad_y, Tensor a, Tensor b) -> Tensor")


@torch.library.register_fake("fmkernels::swiglu_fwd")
def _fwd_fake(a, b):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.register_fake("fmkernels::swiglu_bwd")
def _bwd_fake(grad_y, a, b):
    return a.new_empty((*a.shape[:-1], 2 * a.shape[-1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_backward(bwd):
    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        g = bwd(gy, a, b)  # (..., 2F): [grad_a, grad_b]
        F_ = a.shape[-1]
        return g[..., :F_], g[..., F_:]

    return backward


BWD = _autograd.backward("swiglu", _setup_context, _make_backward)  # one backward, every backend's forward
BWD.attach("fmkernels::swiglu_fwd", torch.ops.fmkernels.swiglu_bwd)


class _PackedSwiGLU(torch.autograd.Function):
    """silu(ab[..., :F]) * ab[..., F:] with the packed (..., 2F) gradient straight from the kernel."""

    @staticmethod
    def forward(ctx, ab, fwd, bwd):
        F_ = ab.shape[-1] // 2
        ctx.save_for_backward(ab)
        ctx.bwd = bwd
        return fwd(ab[..., :F_], ab[..., F_:])

    @staticmethod
    def backward(ctx, gy):
        (ab,) = ctx.saved_tensors
        F_ = ab.shape[-1] // 2
        return ctx.bwd(gy, ab[..., :F_], ab[..., F_:]), None, None


def _cpu_fwd(a, b):
    return torch.ops.fmkernels.swiglu_fwd(a, b)


def _cpu_bwd(g, a, b):
    return torch.ops.fmkernels.swiglu_bwd(g, a, b)


def _compiled(a, b, packed):
    if packed is not None:
        return _PackedSwiGLU.apply(packed, _cpu_fwd, _cpu_bwd)
    return torch.ops.fmkernels.swiglu_fwd(a, b)


def triton_module():
    """fmkernels/triton/swiglu.py with this op's backward attached (imported on first use: triton is optional)."""
    from ..triton import swiglu as tri

    BWD.attach(tri.swiglu_fwd_triton, tri.swiglu_bwd_triton)
    return tri


def _triton(a, b, packed):
    tri = triton_module()
    if packed is not None:
        return _PackedSwiGLU.apply(packed, tri.swiglu_fwd_triton, tri.swiglu_bwd_triton)
    return tri.swiglu_triton(a, b)


def _reference(a, b, packed):
    return ref.swiglu(a, b)


OP = _dispatch.op("swiglu")
OP.register(_dispatch.Backend("cuda", _compiled, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",)))
OP.register(_dispatch.Backend("triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
OP.register(_dispatch.Backend("cpu", _compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
OP.register(_dispatch.Backend("reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))

__all__ = ["swiglu"]


def swiglu(a: torch.Tensor, b: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """silu(a) * b, fp32 arithmetic, returned in a's dtype; differentiable in a and b.

    `swiglu(a, b)`: a, b of the same shape (..., F) and dtype. `swiglu(ab)`: ab is (..., 2F) packed as
    [a | b] (one gate/up projection); returns (..., F) and its gradient is packed the same way.
    backend: "cpu" | "triton" | "reference" forces one (default: the fastest that fits; FMK_BACKEND).
    """
    op = "fmkernels.swiglu"
    packed = None
    if b is None:
        check_tensor("ab", a, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
        if a.shape[-1] % 2:
            raise ValueError(f"{op}: a packed input ab must have an even last dim (2F), got shape {tuple(a.shape)}")
        packed = a if a.stride(-1) == 1 else a.contiguous()
        F_ = a.shape[-1] // 2
        a, b = packed[..., :F_], packed[..., F_:]
    else:
        check_tensor("a", a, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
        check_tensor("b", b, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
        check_same_device(op, a=a, b=b)
        if a.shape != b.shape:
            raise ValueError(f"{op}: b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
        if a.dtype != b.dtype:
            raise TypeError(f"{op}: b must have a's dtype {a.dtype}, got {b.dtype}")
    q = _dispatch.Query(device=a.device.type, dtype=a.dtype, shape=(a.shape[-1],))
    impl = OP.select(q, backend)
    return impl.fn(a, b, packed)
