"""Reference (oracle) implementations of the quantized ops, in plain readable PyTorch.

Formats (shared by every backend):
- int8 weights, "vnni16x4": B (N, K) int8 -> packed (Np/16, Kp/4, 16, 4) int8 (Np = N rounded up to 16, Kp = K
  rounded up to 4, zero padding): packed[nb, kq, i, j] = B[16 nb + i, 4 kq + j]. comp (Np,) int32 = 128 * sum_k B[n, k]
  (the correction for kernels that compute with unsigned activations a + 128).
- int4 weights, "int4x8": q (N, K) in [0, 15] -> packed (Np/16, K/8, 16, 4) uint8:
  packed[nb, t, i, j] = q[16 nb + i, 8 t + j] | q[16 nb + i, 8 t + 4 + j] << 4.
  W = (q - zero[g, n]) * scale[g, n], g = k // group_size; scale / zero are fp32 (K/G, Np).
- int8 weight-only, "wo8": q (N, K) int8 -> packed (Np/16, K/4, 16, 4) uint8 = q + 128 in the vnni16x4 order
  (padding holds 128, i.e. a zero weight); W = (packed - 128) * scale[g, n], scale fp32 (K/G, Np), one group
  (G = K) for per-channel weights. K is a multiple of 4 and of G (layers pad it; see quantization/).
- dynamic activation quantization: per row, symmetric, amax / 127, round half to even.
"""
from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ---------------------------------------------------------------- int8


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q int8 (M, K), scale fp32 (M,)) with x ~= q * scale[:, None]."""
    xf = x.float()
    amax = xf.abs().amax(dim=1) if xf.shape[1] else xf.new_zeros(xf.shape[0])  # NaN / inf when a row holds one
    finite = torch.isfinite(amax)
    # tensor / tensor: correctly rounded fp32 division (torch turns `scalar / tensor` and `tensor / scalar` into
    # a reciprocal times a product, which rounds differently from the kernels' true division)
    c127 = torch.full_like(amax, 127.0)
    # a row with a NaN or Inf: scale NaN and codes 0, so every output it reaches is NaN (testing.NONFINITE_RULE)
    scale = torch.where(finite, amax / c127, torch.full_like(amax, float("nan")))
    inv = torch.where(finite & (amax > 0), c127 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv[:, None]).clamp_(-127, 127)
    q = torch.where(finite[:, None], q, torch.zeros_like(q)).to(torch.int8)
    return q, scale


def quantize_per_row_two_terms(x: torch.Tensor):
    """Two int8 terms: x ~= q_hi * s + q_lo * s / 254 (what the int4 kernel's 'A16' mode feeds the GEMM)."""
    q, scale = quantize_per_row(x)
    xf = x.float()
    amax = scale * 127.0
    prod = q.float() * scale[:, None]
    r = xf - prod
    finite = torch.isfinite(scale)
    inv2 = torch.where(finite & (amax > 0), torch.full_like(amax, 127.0 * 254.0) / amax, torch.zeros_like(amax))
    lo = torch.round(r * inv2[:, None]).clamp_(-127, 127)
    lo = torch.where(finite[:, None], lo, torch.zeros_like(lo)).to(torch.int8)
    return q, scale, lo, scale / torch.full_like(scale, 254.0)


def int8_pack_weight(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = b.shape
    Np, Kp = _round_up(max(N, 1), 16), _round_up(max(K, 1), 4)
    bp = torch.zeros(Np, Kp, dtype=torch.int8, device=b.device)
    bp[:N, :K] = b
    packed = bp.view(Np // 16, 16, Kp // 4, 4).permute(0, 2, 1, 3).contiguous()
    comp = 128 * bp.to(torch.int32).sum(dim=1, dtype=torch.int32)
    return packed, comp.to(torch.int32)


def int8_unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of int8_pack_weight: (N, K) int8."""
    nb, kq = packed.shape[0], packed.shape[1]
    return packed.permute(0, 2, 1, 3).reshape(nb * 16, kq * 4)[:n, :k]


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 (M, K) @ int8 (N, K)^T -> int32 (float64 products and sums are exact below 2^53)."""
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_mm(a, a_scale, b_packed, b_comp, b_scale, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """(a @ B^T) * a_scale[:, None] * b_scale[None, :] (+ bias) in out_dtype; raw int32 for out_dtype=int32."""
    N, K = b_scale.shape[0], a.shape[1]
    acc = int_matmul(a, int8_unpack_weight(b_packed, N, K))
    if out_dtype == torch.int32:
        return acc
    y = acc.float() * a_scale.float()[:, None] * b_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_linear(x, b_packed, b_comp, b_scale, bias=None) -> torch.Tensor:
    """Dynamic per-token activation quantization + int8_mm; output in x's dtype."""
    q, s = quantize_per_row(x)
    return int8_mm(q, s, b_packed, b_comp, b_scale, bias, x.dtype)


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 weights: (q (N, K) int8, scale (N,) fp32)."""
    return quantize_per_row(w)


# ---------------------------------------------------------------- int4


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """w (N, K) float -> (q uint8 (N, K) in [0, 15], scale fp32 (K/G, N), zero fp32 (K/G, N)).

    asymmetric: per group [min, max] -> scale = (max - min) / 15, zero = round(-min / scale) in [0, 15];
    symmetric: scale = amax / 7.5 (codes -8..7 stored + 8, torchao's convention), zero = 8."""
    N, K = w.shape
    G = group_size
    wg = w.float().reshape(N, K // G, G)
    if symmetric:
        amax = wg.abs().amax(dim=2)
        scale = amax / 7.5
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 8.0)
    else:
        mn = wg.amin(dim=2).clamp(max=0)
        mx = wg.amax(dim=2).clamp(min=0)
        scale = (mx - mn) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-mn / scale).clamp_(0, 15)
    q = torch.round(wg / scale[:, :, None] + zero[:, :, None]).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return q, scale.t().contiguous(), zero.t().contiguous()


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (N, K), scale/zero (K/G, >= N) -> W (N, K) fp32."""
    N, K = q.shape
    s = scale[:, :N].t().repeat_interleave(group_size, dim=1)  # (N, K)
    z = zero[:, :N].t().repeat_interleave(group_size, dim=1)
    return (q.float() - z) * s


def int4_pack_weight(q: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    Np = _round_up(max(N, 1), 16)
    qp = torch.zeros(Np, K, dtype=torch.uint8, device=q.device)
    qp[:N] = q & 0xF
    v = qp.view(Np // 16, 16, K // 8, 2, 4)  # (nb, i, t, half, j)
    packed = v[:, :, :, 0, :] | (v[:, :, :, 1, :] << 4)  # (nb, i, t, j)
    return packed.permute(0, 2, 1, 3).contiguous()


def int4_unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb, t = packed.shape[0], packed.shape[1]
    p = packed.permute(0, 2, 1, 3)  # (nb, i, t, j)
    lo, hi = p & 0xF, p >> 4
    q = torch.stack([lo, hi], dim=3).reshape(nb * 16, t * 8)
    return q[:n, :k]


def int4_mm(x, w_packed, scale, zero, group_size: int, n: int, bias=None, act_terms: int = 2) -> torch.Tensor:
    """x (M, K) @ dequant(W)^T (+ bias), exact fp32 activations (act_terms is a kernel knob, ignored here)."""
    K = x.shape[1]
    w = dequantize_int4(int4_unpack_weight(w_packed, n, K), scale, zero, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------- int8 weight-only


def int8_weight_only_pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 (K a multiple of 4) -> packed (Np/16, K/4, 16, 4) uint8 = q + 128."""
    packed, _ = int8_pack_weight(q)
    return (packed.to(torch.int16) + 128).to(torch.uint8)


def int8_weight_only_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of int8_weight_only_pack: (n, k) int8."""
    return (int8_unpack_weight(packed, n, k).to(torch.int16) - 128).to(torch.int8)


def dequantize_int8_weight_only(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (N, K) int8, scale (K/G, >= N) -> W (N, K) fp32."""
    N = q.shape[0]
    s = scale[:, :N].t().repeat_interleave(group_size, dim=1)  # (N, K)
    return q.float() * s


def quantize_int8_grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float (K a multiple of group_size) -> (q (N, K) int8, scale (K/G, N) fp32), symmetric amax / 127
    per group (group_size = K: per output channel)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    amax = wg.abs().amax(dim=2)
    scale = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(wg * inv[:, :, None]).clamp_(-127, 127).to(torch.int8).reshape(N, K)
    return q, scale.t().contiguous()


def int8_weight_only_mm(x, w_packed, scale, group_size: int, n: int, bias=None) -> torch.Tensor:
    """x (M, K) @ dequant(W)^T (+ bias) in fp32 with exact fp32 activations; output in x's dtype."""
    K = x.shape[1]
    w = dequantize_int8_weight_only(int8_weight_only_unpack(w_packed, n, K), scale, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------- fp8

FP8_MAX = 448.0  # float8_e4m3fn


def quantize_fp8(x: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8_e4m3fn (M, K), scale fp32 (M,) or ()): x ~= q * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=1) if per_row else xf.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    s = scale[:, None] if per_row else scale
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_mm(a, a_scale, b, b_scale, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """a (M, K) e4m3, b (N, K) e4m3; scales per tensor () or per row (M,) / (N,)."""
    asc = a_scale.float().reshape(-1, 1) if a_scale.dim() else a_scale.float()
    bsc = b_scale.float().reshape(1, -1) if b_scale.dim() else b_scale.float()
    y = (a.float() @ b.float().t()) * asc * bsc
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fake_quant_int4(w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    q, s, z = quantize_int4(w, group_size, symmetric)
    return dequantize_int4(q, s, z, group_size).to(w.dtype)


def fake_quant_per_row_int8(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_per_row(x)
    return (q.float() * s[:, None]).to(x.dtype)
