"""2:4 sparse matmul in Triton: y = x @ W^T with W as values (N, K/2) + meta int32 (N, ceil(K/32)).

One program per (BLOCK_M, BLOCK_N) tile of y. Per BLOCK_K columns, the W tile is rebuilt in registers from the
kept values: column k of group g = k // 4 holds value 2g if pos(2g) == k % 4, value 2g+1 if pos(2g+1) == k % 4,
else 0; then one tl.dot. Reads half of W's bytes (plus 1/8 byte of meta per weight). The int8 variant
accumulates exactly in int32. `sparse24_sddmm_triton`: the gradient of the kept values (the backward's second
product). Loads are upcast to fp32 before arithmetic (interpreter). Autograd: fmkernels/ops/sparse.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _w_tile(V, META, offs_n, k0, N, K, stride_vn, stride_mn, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) dense tile of W rebuilt from its kept values (values' dtype)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    j0 = (offs_k // 4) * 2  # first kept value of the column's group
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    row_v = V + offs_n[:, None].to(tl.int64) * stride_vn
    row_m = META + offs_n[:, None].to(tl.int64) * stride_mn
    v0 = tl.load(row_v + j0[None, :], mask=mask, other=0)
    v1 = tl.load(row_v + j0[None, :] + 1, mask=mask, other=0)
    w0 = tl.load(row_m + (j0 // 16)[None, :], mask=mask, other=0)
    w1 = tl.load(row_m + ((j0 + 1) // 16)[None, :], mask=mask, other=0)
    p0 = (w0 >> ((j0 % 16) * 2)[None, :]) & 3
    p1 = (w1 >> (((j0 + 1) % 16) * 2)[None, :]) & 3
    c = (offs_k % 4)[None, :]
    zero = tl.zeros_like(v0)
    return tl.where(p0 == c, v0, tl.where(p1 == c, v1, zero))


@triton.jit
def _sparse24_mm_kernel(
    X, V, META, BIAS, Y,
    M, N, K,
    stride_xm, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, IS_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _w_tile(V, META, offs_n, k0, N, K, stride_vn, stride_mn, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        if IS_INT8:
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _launch(x, values, meta, bias, out_dtype, is_int8):
    M, K = x.shape
    N = values.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return y
    interp = x.device.type == "cpu"
    BM, BN, BK = (16, 16, 32) if interp else (64, 64, 64)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _sparse24_mm_kernel[grid](
        x, values, meta, bias if bias is not None else values, y,
        M, N, K, x.stride(0), values.stride(0), meta.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, IS_INT8=is_int8, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )
    return y


@torch.library.custom_op("fmkernels::sparse24_mm_triton", mutates_args=())
def sparse24_mm_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch(x.contiguous(), values.contiguous(), meta.contiguous(), bias, x.dtype, False)


@sparse24_mm_triton.register_fake
def _(x, values, meta, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


@torch.library.custom_op("fmkernels::sparse24_int8_mm_triton", mutates_args=())
def sparse24_int8_mm_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return _launch(x.contiguous(), values.contiguous(), meta.contiguous(), None, torch.int32, True)


@sparse24_int8_mm_triton.register_fake
def _(x, values, meta):
    return x.new_empty((x.shape[0], values.shape[0]), dtype=torch.int32)


@triton.jit
def _sparse24_sddmm_kernel(
    GY, X, META, OUT,
    M, N, K,
    stride_gm, stride_xm, stride_mn, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """OUT (N, K/2) fp32: per (BLOCK_N rows of W, BLOCK_G groups of 4 columns) the dense tile gy^T @ x
    (BLOCK_N, 4 * BLOCK_G), then the two kept positions of each group picked out of it."""
    pid_n, pid_g = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_g * BLOCK_G * 4 + tl.arange(0, BLOCK_G * 4)
    acc = tl.zeros((BLOCK_N, BLOCK_G * 4), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        gy = tl.load(GY + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0).to(tl.float32)  # (BM, BN)
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)  # (BM, 4 BG)
        acc += tl.dot(tl.trans(gy), x)
    g3 = tl.reshape(acc, (BLOCK_N, BLOCK_G, 4))
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, 4)
    mask = (offs_n[:, None] < N) & (offs_g[None, :] < K // 4)
    for t in tl.static_range(2):
        j = offs_g * 2 + t  # kept value index (BG,)
        word = tl.load(META + offs_n[:, None].to(tl.int64) * stride_mn + (j // 16)[None, :], mask=mask, other=0)
        pos = (word >> ((j % 16) * 2)[None, :]) & 3  # (BN, BG)
        v = tl.sum(tl.where(lane[None, None, :] == pos[:, :, None], g3, 0.0), axis=2)
        tl.store(OUT + offs_n[:, None].to(tl.int64) * stride_on + j[None, :], v, mask=mask)


@torch.library.custom_op("fmkernels::sparse24_sddmm_triton", mutates_args=())
def sparse24_sddmm_triton(grad_y: torch.Tensor, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    grad_y, x, meta = grad_y.contiguous(), x.contiguous(), meta.contiguous()
    M, K = x.shape
    N = grad_y.shape[1]
    out = torch.zeros((N, K // 2), device=x.device, dtype=torch.float32)
    if M == 0 or N == 0 or K == 0:
        return out
    interp = x.device.type == "cpu"
    BM, BN, BG = (16, 16, 8) if interp else (64, 64, 16)
    grid = (triton.cdiv(N, BN), triton.cdiv(K // 4, BG))
    _sparse24_sddmm_kernel[grid](
        grad_y, x, meta, out, M, N, K, grad_y.stride(0), x.stride(0), meta.stride(0), out.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_G=BG,
    )
    return out


@sparse24_sddmm_triton.register_fake
def _(grad_y, x, meta):
    return x.new_empty((grad_y.shape[1], x.shape[1] // 2), dtype=torch.float32)
