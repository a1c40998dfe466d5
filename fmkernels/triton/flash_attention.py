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
    Q, K, V, O, LSE, CU_Q, CU_K,
    Hq, Nq, Nk, D, group, off, left, right, scale_log2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    q0 = 0
    if VARLEN:  # sequence program_id(2): rows [cu_q[s], cu_q[s+1]) of q, [cu_k[s], cu_k[s+1]) of k/v
        sid = tl.program_id(2)
        q0 = tl.load(CU_Q + sid).to(tl.int64)
        k0 = tl.load(CU_K + sid).to(tl.int64)
        Nq = (tl.load(CU_Q + sid + 1) - q0).to(tl.int32)
        Nk = (tl.load(CU_K + sid + 1) - k0).to(tl.int32)
        off = Nk - Nq
        Q += q0 * sqn
        O += q0 * son
        K += k0 * skn
        V += k0 * svn
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
    tl.store(LSE + b * slb + h * slh + q0 + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, CU_Q, CU_K,
    Hq, Hkv, Nq, Nk, D, group, off, left, right, scale, scale_log2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, slb, slh, sob, soh, son,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * Hkv
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    q0 = 0
    if VARLEN:
        sid = tl.program_id(2)
        q0 = tl.load(CU_Q + sid).to(tl.int64)
        k0 = tl.load(CU_K + sid).to(tl.int64)
        Nq = (tl.load(CU_Q + sid + 1) - q0).to(tl.int32)
        Nk = (tl.load(CU_K + sid + 1) - k0).to(tl.int32)
        off = Nk - Nq
        Q += q0 * sqn
        DO += q0 * sdn
        K += k0 * skn
        V += k0 * svn
        DK += k0 * son
        DV += k0 * son
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
            lse2 = tl.load(LSE2 + b * slb + h * slh + q0 + offs_m, mask=offs_m < Nq, other=float("inf"))
            delta = tl.load(DELTA + b * slb + h * slh + q0 + offs_m, mask=offs_m < Nq, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(s - lse2[:, None])
            p = tl.where(_visible(offs_m, offs_n, Nq, Nk, off, left, right, HAS_LEFT, HAS_RIGHT), p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
    out = b * sob + hk * soh + offs_n[:, None] * son + offs_d[None, :]  # dk/dv: unit stride along D
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, CU_Q, CU_K,
    Hq, Nq, Nk, D, group, off, left, right, scale, scale_log2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, slb, slh, sob, soh, son,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * Hq
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    q0 = 0
    if VARLEN:
        sid = tl.program_id(2)
        q0 = tl.load(CU_Q + sid).to(tl.int64)
        k0 = tl.load(CU_K + sid).to(tl.int64)
        Nq = (tl.load(CU_Q + sid + 1) - q0).to(tl.int32)
        Nk = (tl.load(CU_K + sid + 1) - k0).to(tl.int32)
        off = Nk - Nq
        Q += q0 * sqn
        DO += q0 * sdn
        DQ += q0 * son
        K += k0 * skn
        V += k0 * svn
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q_mask = (offs_m[:, None] < Nq) & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE2 + b * slb + h * slh + q0 + offs_m, mask=offs_m < Nq, other=float("inf"))
    delta = tl.load(DELTA + b * slb + h * slh + q0 + offs_m, mask=offs_m < Nq, other=0.0)
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
    tl.store(DQ + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(D: int, device: torch.device, dtype: torch.dtype = torch.float16,
            bwd: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). Chosen so that no variant spills or exceeds sm_80's 163 KiB of
    shared memory in scripts/triton_aot.py (sm_80 and sm_90 cubins, triton 3.7): fp32 at D > 128 with 32x32 tiles
    needed 168-197 KiB; the bf16/fp16 backward with 64x64 tiles (D <= 64) and with 4 warps at D = 128 spilled
    (4-10 local stores, sm_80)."""
    block_d = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":  # interpreter: one small config keeps the tests fast
        return 16, 16, block_d, 1
    if dtype == torch.float32 and block_d > 128:
        return 16, 16, block_d, 4
    if bwd:
        if dtype == torch.float32:
            return 32, 32, block_d, 4
        return (64, 32, block_d, 4) if block_d <= 64 else ((64, 32, block_d, 8) if block_d <= 128 else (32, 32, block_d, 8))
    if block_d <= 32:  # 64x64 spilled 2 local stores in the varlen-capable forward (bf16/fp16, sm_80)
        return 64, 32, block_d, 4
    if block_d <= 64:
        return 64, 64, block_d, 4
    if block_d <= 128:
        return 64, 32, block_d, 4
    return 32, 32, block_d, 8


def _fwd(q, k, v, scale, window_left, window_right, cu_q=None, cu_k=None, max_q=0, max_k=0):
    """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) views (unit stride along D) -> out (like q, its own storage given by
    the caller's layout), lse (B, Hq, Nq). With cu_q / cu_k: B == 1, the N axis packs sequences."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_q is not None
    if varlen:
        out_store = torch.empty((Nq, Hq, D), device=q.device, dtype=q.dtype)
        out = out_store.transpose(0, 1).unsqueeze(0)
        lse_store = torch.empty((Hq, Nq), device=q.device, dtype=torch.float32)
        lse = lse_store.unsqueeze(0)
    else:
        out_store = out = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)
        lse_store = lse = torch.empty((B, Hq, Nq), device=q.device, dtype=torch.float32)
    BM, BN, BD, warps = _blocks(D, q.device, q.dtype)
    nseq = cu_q.numel() - 1 if varlen else 1
    grid = (triton.cdiv(max(max_q if varlen else Nq, 1), BM), B * Hq, max(nseq, 1))
    if varlen and nseq == 0:
        return out_store, lse_store
    cu_q = cu_q if varlen else lse  # unused placeholder pointers when dense
    cu_k = cu_k if varlen else lse
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        Hq, Nq, Nk, D, Hq // Hkv, Nk - Nq, window_left, window_right, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, VARLEN=varlen,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps,
    )
    return out_store, lse_store


def _bwd(grad_out, q, k, v, out, lse, scale, window_left, window_right, cu_q=None, cu_k=None, max_q=0, max_k=0):
    """Views as in _fwd (lse (B, Hq, Nq)); returns dq, dk, dv in the caller's layout (packed when cu_q given)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_q is not None
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (B, Hq, Nq)
    lse2 = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse * _LOG2E).contiguous()
    if varlen:
        dq_s = torch.empty((Nq, Hq, D), device=q.device, dtype=q.dtype)
        dk_s = torch.empty((Nk, Hkv, D), device=q.device, dtype=k.dtype)
        dv_s = torch.empty((Nk, Hkv, D), device=q.device, dtype=v.dtype)
        dq, dk, dv = (t.transpose(0, 1).unsqueeze(0) for t in (dq_s, dk_s, dv_s))
    else:
        dq_s = dq = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)
        dk_s = dk = torch.empty((B, Hkv, Nk, D), device=q.device, dtype=k.dtype)
        dv_s = dv = torch.empty((B, Hkv, Nk, D), device=q.device, dtype=v.dtype)
    nseq = cu_q.numel() - 1 if varlen else 1
    if varlen and (nseq == 0 or Nq == 0 or Nk == 0):
        return dq_s.zero_(), dk_s.zero_(), dv_s.zero_()
    BM, BN, BD, warps = _blocks(D, q.device, q.dtype, bwd=True)
    cu_q = cu_q if varlen else lse2
    cu_k = cu_k if varlen else lse2
    common = (
        Nq, Nk, D, Hq // Hkv, Nk - Nq, window_left, window_right, scale, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        lse2.stride(0), lse2.stride(1),
    )
    meta = dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, VARLEN=varlen, BLOCK_M=BM, BLOCK_N=BN,
                BLOCK_D=BD, num_warps=warps)
    kgrid = (triton.cdiv(max(max_k if varlen else Nk, 1), BN), B * Hkv, nseq)
    qgrid = (triton.cdiv(max(max_q if varlen else Nq, 1), BM), B * Hq, nseq)
    _bwd_dkdv_kernel[kgrid](q, k, v, grad_out, lse2, delta, dk, dv, cu_q, cu_k, Hq, Hkv, *common,
                            dk.stride(0), dk.stride(1), dk.stride(2), **meta)
    _bwd_dq_kernel[qgrid](q, k, v, grad_out, lse2, delta, dq, cu_q, cu_k, Hq, *common,
                          dq.stride(0), dq.stride(1), dq.stride(2), **meta)
    return dq_s, dk_s, dv_s


@torch.library.custom_op("fmkernels::flash_attention_fwd_triton", mutates_args=())
def flash_attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window_left: int, window_right: int
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return _fwd(q, k, v, scale, window_left, window_right)


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
    return _bwd(do, q, k, v, out, lse, scale, window_left, window_right)


@flash_attention_bwd_triton.register_fake
def _(grad_out, q, k, v, out, lse, scale, window_left, window_right):
    return (torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=k.device, dtype=k.dtype),
            torch.empty(v.shape, device=v.device, dtype=v.dtype))
