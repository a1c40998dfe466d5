"""fp8 (e4m3) GEMM in Triton: a (M, K), b (N, K), fp32 accumulation, per-tensor or per-row scales, fused bias.
fp8 tensor-core dots need sm_89+; under the CPU interpreter (no fp8 numpy type) operands are upcast to fp32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_mm_kernel(
    A, B, A_SCALE, B_SCALE, BIAS, C,
    M, N, K,
    stride_am, stride_bn, stride_cm, stride_as, stride_bs,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(B + rn[None, :] * stride_bn + rk[:, None], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    sa = tl.load(A_SCALE + rm * stride_as, mask=rm < M, other=0.0)
    sb = tl.load(B_SCALE + rn * stride_bs, mask=rn < N, other=0.0)
    y = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], y.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_mm_triton(a, a_scale, b, b_scale, bias, out_dtype):
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    interp = a.device.type == "cpu"
    if interp:  # numpy has no fp8: hand the interpreter fp32 copies holding the same values
        a, b = a.float(), b.float()
    BM, BN, BK = (16, 32, 32) if interp else (64, 128, 64)
    a_s = a_scale.reshape(-1).float()
    b_s = b_scale.reshape(-1).float()
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _fp8_mm_kernel[grid](
        a, b, a_s, b_s, bias if bias is not None else a_s, c,
        M, N, K,
        a.stride(0), b.stride(0), c.stride(0), 1 if a_s.numel() > 1 else 0, 1 if b_s.numel() > 1 else 0,
        HAS_BIAS=bias is not None, UPCAST=interp,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=1 if interp else 8,  # 4 warps: 160 local stores (sm_90)
    )
    return c
