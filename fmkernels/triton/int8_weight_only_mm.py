"""int8 weight-only GEMM (W8A16) in Triton on the "wo8" layout (fmkernels/reference/quant.py): weight bytes are
loaded and dequantized in registers, (u - 128) * scale[g, n], then a tl.dot on the tensor cores (bf16/fp16 operands;
fp32 ones as tf32: its 2^-11 rounding is below the int8 weights' quantization step; plain fp32 under the CPU
interpreter). 64-row tiles use 8 warps, as int4's do (4 warps spill there).
B[n, k] byte: ((n // 16) * (K / 4) + k // 4) * 64 + (n % 16) * 4 + k % 4."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_wo_mm_kernel(
    X, W, SCALE, BIAS, C,
    M, N, K, NP, G,
    stride_xm, stride_cm,
    HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    KQ = K // 4
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = rk < K
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        off = ((rn[None, :] // 16) * KQ + rk[:, None] // 4) * 64 + (rn[None, :] % 16) * 4 + rk[:, None] % 4
        wmask = kmask[:, None] & (rn[None, :] < NP)
        u = tl.load(W + off, mask=wmask, other=128).to(tl.int32)
        s = tl.load(SCALE + (rk[:, None] // G) * NP + rn[None, :], mask=wmask, other=0.0)
        w = (u - 128).to(tl.float32) * s  # (BLOCK_K, BLOCK_N)
        if IEEE_DOT:  # the CPU interpreter: plain fp32
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:  # tensor cores: bf16/fp16 operands, fp32 ones as tf32
            acc += tl.dot(x, w.to(x.dtype), input_precision="tf32")
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_weight_only_mm_triton(x, w_packed, scale, group_size, n, bias):
    M, K = x.shape
    c = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if M == 0 or n == 0:
        return c
    interp = x.device.type == "cpu"
    BM, BN, BK = (16, 32, 32) if interp else ((16 if M <= 16 else 64), 64, 64)
    warps = 8 if BM == 64 and not interp else 4
    grid = (triton.cdiv(M, BM), triton.cdiv(n, BN))
    _int8_wo_mm_kernel[grid](
        x, w_packed, scale, bias if bias is not None else scale, c,
        M, n, K, w_packed.shape[0] * 16, group_size,
        x.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, IEEE_DOT=interp,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps,
    )
    return c
