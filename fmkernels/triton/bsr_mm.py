"""Block-sparse (BSR) matmul in Triton: y = x @ W^T, W as (blocks (nnzb, B, B), row_ptr, col_idx).

One program per (BLOCK_M rows of x, block row r of W): loops over the kept blocks of row r only
(row_ptr[r] .. row_ptr[r+1]), one tl.dot of the (BLOCK_M, B) slice of x with each block^T. Accumulates in fp32.
Loads are upcast to fp32 before arithmetic (interpreter). Autograd: fmkernels/ops/sparse.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _bsr_mm_kernel(
    X, BLK, ROW_PTR, COL_IDX, BIAS, Y,
    M, N,
    stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, r = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    start = tl.load(ROW_PTR + r).to(tl.int64)
    end = tl.load(ROW_PTR + r + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for i in range(start, end):
        c = tl.load(COL_IDX + i).to(tl.int64)
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + c * B + offs_b[None, :],
                    mask=offs_m[:, None] < M, other=0.0).to(tl.float32)  # (BLOCK_M, B)
        w = tl.load(BLK + i * B * B + offs_b[:, None] * B + offs_b[None, :]).to(tl.float32)  # (n, k)
        acc += tl.dot(x, tl.trans(w))
    offs_n = r * B + offs_b
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=offs_m[:, None] < M)


@torch.library.custom_op("fmkernels::bsr_mm_triton", mutates_args=())
def bsr_mm_triton(x: torch.Tensor, blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous()
    M = x.shape[0]
    B = blocks.shape[1]
    nbr = row_ptr.shape[0] - 1
    y = torch.empty((M, nbr * B), device=x.device, dtype=x.dtype)
    if M == 0 or nbr == 0:
        return y
    BM = 16 if x.device.type == "cpu" else 64
    _bsr_mm_kernel[(triton.cdiv(M, BM), nbr)](
        x, blocks.contiguous(), row_ptr.contiguous(), col_idx.contiguous(), bias if bias is not None else x, y,
        M, nbr * B, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, B=B, BLOCK_M=BM,
    )
    return y


@bsr_mm_triton.register_fake
def _(x, blocks, row_ptr, col_idx, bias):
    return x.new_empty((x.shape[0], (row_ptr.shape[0] - 1) * blocks.shape[1]))
