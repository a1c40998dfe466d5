"""int4 weight-only GEMM (W4A16) in Triton on the shared int4 layout (fmkernels/reference/quant.py): nibbles are
loaded and dequantized in registers, (q - zero) * scale per group, then a tl.dot on the tensor cores (bf16/fp16 operands;
fp32 ones as tf32: the 4-bit weights' quantization step dwarfs tf32's 2^-11 rounding, and tf32x3 spills 97-138
local stores at 64x64; plain fp32 under the CPU interpreter).
B[n, k] byte: ((n // 16) * (K / 8) + k // 8) * 64 + (n % 16) * 4 + k % 4, high nibble when (k // 4) is odd."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_mm_kernel(
    X, W, SCALE, ZERO, BIAS, C,
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
    KT = K // 8
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = rk < K
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        off = ((rn[None, :] // 16) * KT + rk[:, None] // 8) * 64 + (rn[None, :] % 16) * 4 + rk[:, None] % 4
        byte = tl.load(W + off, mask=kmask[:, None] & (rn[None, :] < NP), other=0).to(tl.int32)
        q = (byte >> (((rk[:, None] // 4) % 2) * 4)) & 0xF
        g = rk // G
        soff = g[:, None] * NP + rn[None, :]
        smask = kmask[:, None] & (rn[None, :] < NP)
        s = tl.load(SCALE + soff, mask=smask, other=0.0)
        z = tl.load(ZERO + soff, mask=smask, other=0.0)
        w = (q.to(tl.float32) - z) * s  # (BLOCK_K, BLOCK_N)
        if IEEE_DOT:  # the CPU interpreter: plain fp32
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:  # tensor cores: bf16/fp16 operands, fp32 ones as tf32
            acc += tl.dot(x, w.to(x.dtype), input_precision="tf32")
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int4_mm_triton(x, w_packed, scale, zero, group_size, n, bias, act_terms):
    M, K = x.shape
    c = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if M == 0 or n == 0:
        return c
    interp = x.device.type == "cpu"
    BM, BN, BK = (16, 32, 32) if interp else ((16 if M <= 16 else 64), 64, 64)
    # 64x64 tiles dequantized in registers spill with 4 warps (13-23 local stores, bf16, sm_80/sm_90), not with 8
    warps = 8 if BM == 64 and not interp else 4
    grid = (triton.cdiv(M, BM), triton.cdiv(n, BN))
    _int4_mm_kernel[grid](
        x, w_packed, scale, zero, bias if bias is not None else scale, c,
        M, n, K, w_packed.shape[0] * 16, group_size,
        x.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, IEEE_DOT=interp,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps,
    )
    return c
