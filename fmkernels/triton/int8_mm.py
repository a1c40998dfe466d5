"""int8 GEMM in Triton on the shared packed layout (fmkernels/reference/quant.py: B[n, k] lives at
((n // 16) * (Kp / 4) + k // 4) * 64 + (n % 16) * 4 + k % 4), exact int32 accumulation (`tl.dot(..., out_dtype=
tl.int32)`), fused dequantizing epilogue; plus dynamic per-row quantization (one program per row).

Rounding half to even with the 1.5 * 2^23 trick (exact for |v| < 2^22), so codes match the reference bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_RNE = 12582912.0  # 1.5 * 2**23


@triton.jit
def _quantize_rows_kernel(
    X, Q, S,
    K,
    stride_x, stride_q,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    m = tl.max(amax, axis=0)
    scale = tl.math.div_rn(m, tl.full([], 127.0, tl.float32))  # IEEE division, as the reference and the CPU kernel
    inv = tl.where(m > 0, tl.math.div_rn(tl.full([], 127.0, tl.float32), m), 0.0)
    tl.store(S + row, scale)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        v = x * inv
        r = (v + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(Q + row * stride_q + cols, r.to(tl.int8), mask=cols < K)


@triton.jit
def _int8_mm_kernel(
    A, B, A_SCALE, B_SCALE, BIAS, C,
    M, N, K, KQ,
    stride_am, stride_cm,
    HAS_BIAS: tl.constexpr, OUT_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        boff = ((rn[None, :] // 16) * KQ + rk[:, None] // 4) * 64 + (rn[None, :] % 16) * 4 + rk[:, None] % 4
        b = tl.load(B + boff, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    cptr = C + rm[:, None] * stride_cm + rn[None, :]
    if OUT_INT:
        tl.store(cptr, acc, mask=cmask)
    else:
        sa = tl.load(A_SCALE + rm, mask=rm < M, other=0.0)
        sb = tl.load(B_SCALE + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(cptr, y.to(C.dtype.element_ty), mask=cmask)


def _blocks(M: int, N: int, interpret: bool):
    if interpret:
        return 16, 32, 32
    return (64 if M > 32 else 16), 128, 64


def _warps(block_m: int) -> int:
    # 64x128 int32 accumulator + packed-B offsets: 4 warps spill (26-31 local stores, sm_80/sm_90), 8 do not
    # (209 registers; scripts/triton_aot.py)
    return 8 if block_m >= 64 else 4


def quantize_per_row_triton(x: torch.Tensor):
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M and K:
        _quantize_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=min(4096, triton.next_power_of_2(K)))
    elif M:
        s.zero_()
    return q, s


def int8_mm_triton(a, a_scale, b_packed, b_comp, b_scale, bias, out_dtype):
    M, K = a.shape
    N = b_scale.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    BM, BN, BK = _blocks(M, N, a.device.type == "cpu")
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _int8_mm_kernel[grid](
        a, b_packed, a_scale, b_scale, bias if bias is not None else b_scale, c,
        M, N, K, b_packed.shape[1],
        a.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, OUT_INT=out_dtype == torch.int32,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=_warps(BM),
    )
    return c


def int8_linear_triton(x, b_packed, b_comp, b_scale, bias):
    q, s = quantize_per_row_triton(x)
    return int8_mm_triton(q, s, b_packed, b_comp, b_scale, bias, x.dtype)
