"""Flash attention in Triton (FlashAttention-2 structure): forward with an online softmax in log2 units;
backward as two deterministic kernels (no atomics): dK/dV per key block looping over the query blocks (and
the query heads of a GQA group) that see it, and dQ per query block looping over its key blocks. P is
recomputed from the saved log-sum-exp; delta = rowsum(dO * O) is computed by the launcher.

q: (B, Hq, Nq, D), k/v: (B, Hkv, Nk, D), any strides with unit stride along D (others are copied).
Masks are bottom-right aligned (query i sits at key position i + Nk - Nq); window bounds < 0 are unbounded.
Fully masked key blocks are skipped by the loop bounds; offsets are 64-bit. Loads are upcast to fp32 before
the softmax arithmetic; the matmuls take the input dtype with fp32 accumulation.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _visible(offs_m, offs_n, Nq, Nk, off, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    pos = offs_m[:, None] + off  # the query's key position
    ok = (offs_n[None, :] < Nk) & (offs_m[:, None] < Nq)
    if HAS_LEFT:
        ok = ok & (offs_n[None, :] >= pos - left)
    if HAS_RIGHT:
        ok = ok & (offs_n[None, :] <= pos + right)
    return ok


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    Hq, Nq, Nk, D, group, off, left, right, scale_log2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m[:, None] < Nq) & dmask[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row0 = pid_m * BLOCK_M
    row1 = tl.minimum(row0 + BLOCK_M, Nq) - 1
    lo = 0
    hi = Nk
    if HAS_LEFT:
        lo = tl.maximum(row0 + off - left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(row1 + off + right + 1, Nk)
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None], mask=(kn[None, :] < Nk) & dmask[:, None], other=0.0)
        s = tl.dot(q, kt).to(tl.float32) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(_visible(offs_m, kn, Nq, Nk, off, left, right, HAS_LEFT, HAS_RIGHT), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: p = 0
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=(kn[:, None] < Nk) & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Nq) & dmask[None, :])
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    Hq, Hkv, Nq, Nk, D, group, off, left, right, scale, scale_log2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * Hkv
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kv_mask = (offs_n[:, None] < Nk) & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    key0 = pid_n * BLOCK_N
    key1 = tl.minimum(key0 + BLOCK_N, Nk)
    lo = 0
    hi = Nq
    if HAS_RIGHT:
        lo = tl.maximum(key0 - off - right, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(key1 - off + left, Nq)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q_mask = (offs_m[:, None] < Nq) & dmask[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :], mask=q_mask, other=0.0)
            lse2 = tl.load(LSE2 + (b * Hq + h) * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
            delta = tl.load(DELTA + (b * Hq + h) * Nq + offs_m, mask=offs_m < Nq, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(s - lse2[:, None])
            p = tl.where(_visible(offs_m, offs_n, Nq, Nk, off, left, right, HAS_LEFT, HAS_RIGHT), p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
    out = b * Hkv * Nk * D + hk * Nk * D + offs_n[:, None] * D + offs_d[None, :]  # dk/dv contiguous
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ,
    Hq, Nq, Nk, D, group, off, left, right, scale, scale_log2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * Hq
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q_mask = (offs_m[:, None] < Nq) & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE2 + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row0 = pid_m * BLOCK_M
    row1 = tl.minimum(row0 + BLOCK_M, Nq) - 1
    lo = 0
    hi = Nk
    if HAS_LEFT:
        lo = tl.maximum(row0 + off - left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(row1 + off + right + 1, Nk)
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n0
        kv_mask = (kn[:, None] < Nk) & dmask[None, :]
        k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(_visible(offs_m, kn, Nq, Nk, off, left, right, HAS_LEFT, HAS_RIGHT), p, 0.0)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
    tl.store(DQ + pid_bh * Nq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(D: int, device: torch.device) -> tuple[int, int, int, int]:
    block_d = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":  # interpreter: one small config keeps the tests fast
        return 16, 16, block_d, 1
    if block_d <= 64:
        return 64, 64, block_d, 4
    if block_d <= 128:
        return 64, 32, block_d, 4
    return 32, 32, block_d, 8


@torch.library.custom_op("fmkernels::flash_attention_fwd_triton", mutates_args=())
def flash_attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window_left: int, window_right: int
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Nq), device=q.device, dtype=torch.float32)
    BM, BN, BD, warps = _blocks(D, q.device)
    grid = (triton.cdiv(Nq, BM), B * Hq)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        Hq, Nq, Nk, D, Hq // Hkv, Nk - Nq, window_left, window_right, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps,
    )
    return out, lse


@flash_attention_fwd_triton.register_fake
def _(q, k, v, scale, window_left, window_right):
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fmkernels::flash_attention_bwd_triton", mutates_args=())
def flash_attention_bwd_triton(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, scale: float, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = _unit_last(grad_out.to(q.dtype))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    delta = (do.float() * out.float()).sum(-1).contiguous()  # (B, Hq, Nq)
    lse2 = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse * _LOG2E).contiguous()
    dq = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Nk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Nk, D), device=q.device, dtype=v.dtype)
    BM, BN, BD, warps = _blocks(D, q.device)
    common = (
        Nq, Nk, D, Hq // Hkv, Nk - Nq, window_left, window_right, scale, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
    )
    meta = dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                num_warps=warps)
    _bwd_dkdv_kernel[(triton.cdiv(Nk, BN), B * Hkv)](q, k, v, do, lse2, delta, dk, dv, Hq, Hkv, *common, **meta)
    _bwd_dq_kernel[(triton.cdiv(Nq, BM), B * Hq)](q, k, v, do, lse2, delta, dq, Hq, *common, **meta)
    return dq, dk, dv


@flash_attention_bwd_triton.register_fake
def _(grad_out, q, k, v, out, lse, scale, window_left, window_right):
    return (torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=k.device, dtype=k.dtype),
            torch.empty(v.shape, device=v.device, dtype=v.dtype))
