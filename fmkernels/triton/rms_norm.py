"""RMSNorm in Triton: one program per row forward; backward with per-program fp32 dw partials (no atomics).

x: (rows, H) contiguous rows; loops over H in BLOCK chunks, so any H works. Loads are upcast to fp32
before arithmetic (the CPU interpreter computes bf16 wrongly otherwise).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    H,
    stride_x_row, stride_y_row,
    eps,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x_row
    y_row = Y + row * stride_y_row
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / H + eps)
    tl.store(RSTD + row, rstd)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < H
        y = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    rows, H, rows_per_program,
    stride_row,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    dw_row = DW_PARTIAL + pid * H
    for i in range(0, rows_per_program):
        r = pid * rows_per_program + i
        r = tl.minimum(r, rows - 1)  # the last program may have fewer rows: redo the last row, skip its dw
        valid = (pid * rows_per_program + i) < rows
        base = r * stride_row
        rstd = tl.load(RSTD + r)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < H
            g = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            acc += g * tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        coef = rstd * rstd * rstd * tl.sum(acc, axis=0) / H
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < H
            dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy
            if HAS_WEIGHT:
                g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + base + cols, (g * rstd - x * coef).to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                part = tl.load(dw_row + cols, mask=mask, other=0.0)
                tl.store(dw_row + cols, part + tl.where(valid, dy * x * rstd, 0.0), mask=mask)


def _block(H: int) -> int:
    return min(triton.next_power_of_2(max(H, 16)), 4096)


@torch.library.custom_op("fmkernels::rms_norm_fwd_triton", mutates_args=())
def rms_norm_fwd_triton(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.contiguous().view(-1, x.shape[-1]) if x.numel() else x.reshape(-1, x.shape[-1])
    rows, H = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows and H:
        _rms_norm_fwd_kernel[(rows,)](
            x2, weight if weight is not None else x2, y, rstd,
            H, x2.stride(0), y.stride(0), eps,
            HAS_WEIGHT=weight is not None, BLOCK=_block(H),
        )
    return y.view(x.shape), rstd.view(x.shape[:-1])


@rms_norm_fwd_triton.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fmkernels::rms_norm_bwd_triton", mutates_args=())
def rms_norm_bwd_triton(
    grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor, compute_dweight: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    H = x.shape[-1]
    x2 = x.contiguous().view(-1, H)
    dy2 = grad_y.to(x.dtype).contiguous().view(-1, H)
    rows = x2.shape[0]
    dx = torch.empty_like(x2)
    want_dw = compute_dweight and weight is not None
    n_prog = max(1, min(rows, 4 * _sm_count(x.device)))
    rows_per_program = triton.cdiv(rows, n_prog) if rows else 1
    n_prog = triton.cdiv(rows, rows_per_program) if rows else 1
    partial = torch.zeros((n_prog, H) if want_dw else (1, 1), device=x.device, dtype=torch.float32)
    if rows and H:
        _rms_norm_bwd_kernel[(n_prog,)](
            dy2, x2, weight if weight is not None else x2, rstd.contiguous().view(-1), dx, partial,
            rows, H, rows_per_program, x2.stride(0),
            HAS_WEIGHT=weight is not None, COMPUTE_DW=want_dw, BLOCK=_block(H),
        )
    dw = partial.sum(0).to(weight.dtype) if want_dw else x.new_empty((0,))
    return dx.view(x.shape), dw


@rms_norm_bwd_triton.register_fake
def _(grad_y, x, weight, rstd, compute_dweight):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return (gx, torch.empty_like(weight)) if (compute_dweight and weight is not None) else (gx, x.new_empty((0,)))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: few programs keep the test fast


def rms_norm_triton(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return rms_norm_fwd_triton(x, weight, eps)[0]
