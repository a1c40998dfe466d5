"""SwiGLU in Triton: one program per row; y = silu(a) * b; backward writes the packed [da | db] gradient.

a, b: (rows, F) views with unit last stride (row strides passed separately, so the two halves of one packed
(rows, 2F) tensor need no copy). Loads are upcast to fp32 before arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(A, B, Y, F, stride_a, stride_b, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < F
        a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
        y = a * tl.sigmoid(a) * b
        tl.store(Y + row * F + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, A, B, OUT, F, stride_g, stride_a, stride_b, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < F
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        silu = a * s
        da = g * b * (s + silu - silu * s)
        tl.store(OUT + row * 2 * F + cols, da.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + row * 2 * F + F + cols, (g * silu).to(OUT.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, F) view with unit last stride (copies only when the layout cannot be flattened)."""
    F = t.shape[-1]
    try:
        v = t.view(-1, F)
    except RuntimeError:
        v = t.reshape(-1, F)
    return v if (v.stride(-1) == 1 or F <= 1) else v.contiguous()


def _block(F: int) -> int:
    return min(triton.next_power_of_2(max(F, 16)), 4096)


@torch.library.custom_op("fmkernels::swiglu_fwd_triton", mutates_args=())
def swiglu_fwd_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    F = a.shape[-1]
    a2, b2 = _rows(a), _rows(b)
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a2.shape[0] and F:
        _swiglu_fwd_kernel[(a2.shape[0],)](a2, b2, y, F, a2.stride(0), b2.stride(0), BLOCK=_block(F))
    return y


@swiglu_fwd_triton.register_fake
def _(a, b):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.custom_op("fmkernels::swiglu_bwd_triton", mutates_args=())
def swiglu_bwd_triton(grad_y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    F = a.shape[-1]
    a2, b2, g2 = _rows(a), _rows(b), _rows(grad_y.to(a.dtype))
    out = torch.empty((*a.shape[:-1], 2 * F), dtype=a.dtype, device=a.device)
    if a2.shape[0] and F:
        _swiglu_bwd_kernel[(a2.shape[0],)](
            g2, a2, b2, out, F, g2.stride(0), a2.stride(0), b2.stride(0), BLOCK=_block(F)
        )
    return out


@swiglu_bwd_triton.register_fake
def _(grad_y, a, b):
    return a.new_empty((*a.shape[:-1], 2 * a.shape[-1]))


def swiglu_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd_triton(a, b)
