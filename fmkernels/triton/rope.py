"""RoPE in Triton: one program per (batch, position) row, all q and k heads (cos/sin loaded once).

q: (B, N, Hq, D), k: (B, N, Hk, D) with unit last stride; cos, sin: (>= N, D/2) fp32. Outputs contiguous.
Loads are upcast to fp32 before arithmetic (the CPU interpreter computes bf16 wrongly otherwise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_heads(X, Y, c, s, x_row_off, y_row_off, H, stride_h, D_HALF, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < D_HALF
    for h in range(0, H):
        xb = X + x_row_off + h * stride_h
        yb = Y + y_row_off + h * 2 * D_HALF
        x1 = tl.load(xb + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xb + D_HALF + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(yb + cols, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(yb + D_HALF + cols, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    N, HQ, HK, D_HALF,
    sq0, sq1, sq2, sk0, sk1, sk2,
    sign,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    cols = tl.arange(0, BLOCK)
    mask = cols < D_HALF
    c = tl.load(COS + n * D_HALF + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + n * D_HALF + cols, mask=mask, other=0.0).to(tl.float32) * sign
    _rope_heads(Q, QO, c, s, b * sq0 + n * sq1, row * HQ * 2 * D_HALF, HQ, sq2, D_HALF, BLOCK)
    _rope_heads(K, KO, c, s, b * sk0 + n * sk1, row * HK * 2 * D_HALF, HK, sk2, D_HALF, BLOCK)


@torch.library.custom_op("fmkernels::rope_triton", mutates_args=())
def rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    B, N, HQ, D = q.shape
    HK = k.shape[2]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * N and D:
        _rope_kernel[(B * N,)](
            q, k, qo, ko, cos.float().contiguous(), sin.float().contiguous(),
            N, HQ, HK, D // 2,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            -1.0 if inverse else 1.0,
            BLOCK=triton.next_power_of_2(max(D // 2, 16)),
        )
    return qo, ko


@rope_triton.register_fake
def _(q, k, cos, sin, inverse):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
