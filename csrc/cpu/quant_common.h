// Shared pieces of the quantized CPU kernels (int8_mm.cpp, int4_mm.cpp): dynamic per-row activation
// quantization into the unsigned/signed byte layouts the VNNI micro-kernels read.
//
// Quantization rule (identical to fmkernels/reference/quant.py::quantize_per_row, bit for bit):
//   amax = max |x[r, :]|  (fp32);  scale = amax / 127;  inv = amax > 0 ? 127 / amax : 0
//   q = clamp(round_half_even(x * inv), -127, 127)
//   a row holding a NaN or an Inf: scale = NaN (and scale2 = NaN), codes 0, so every output it reaches is NaN, as a
//   float matmul would make it NaN or Inf (issue 21: the rule in fmkernels/testing.py, NONFINITE_RULE)
// Optional second term (act_terms == 2, "A16" for int4): the residual x - q * scale is quantized again with
// scale2 = scale / 254, giving ~15 effective activation bits from two int8 rows.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/vec.h"

namespace fmk::cpu::quant {

constexpr float kQMax = 127.0f;
constexpr float kLoDiv = 254.0f;  // second-term scale divisor

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------- portable

// max |x[k]|, +inf when any entry is +-inf, NaN when any is NaN
template <typename T>
static inline float row_amax_portable(const T* x, int64_t K) {
  float m = 0.f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(static_cast<float>(x[k]));
    nan |= std::isnan(a);
    m = std::max(m, a);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// A row with a non-finite amax: codes 0 (q, lo), qsum 0, both scales NaN.
static inline float quant_row_nonfinite(int64_t K, uint8_t* q, int offset, uint8_t* lo, float* scale_lo,
                                        int32_t* qsum) {
  std::fill(q, q + K, static_cast<uint8_t>(offset));
  if (lo) std::fill(lo, lo + K, static_cast<uint8_t>(offset));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (scale_lo) *scale_lo = nan;
  if (qsum) *qsum = 0;
  return nan;
}

static inline int32_t round_clamp(float v) {
  float r = std::nearbyint(v);  // default rounding mode: half to even (as torch.round)
  r = std::min(std::max(r, -kQMax), kQMax);
  return static_cast<int32_t>(r);
}

// Quantize one row; writes q + offset (offset 128 -> unsigned bytes for vpdpbusd, 0 -> signed bytes).
// If lo != nullptr, also the residual term (same offset). Returns scale (and *scale_lo).
template <typename T>
static inline float quant_row_portable(const T* x, int64_t K, uint8_t* q, int offset, uint8_t* lo, float* scale_lo,
                                       int32_t* qsum) {
  const float amax = row_amax_portable(x, K);
  if (!std::isfinite(amax)) return quant_row_nonfinite(K, q, offset, lo, scale_lo, qsum);
  const float scale = amax / kQMax;
  const float inv = amax > 0.f ? kQMax / amax : 0.f;
  const float scale2 = scale / kLoDiv;
  const float inv2 = amax > 0.f ? kQMax * kLoDiv / amax : 0.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float v = static_cast<float>(x[k]);
    const int32_t qi = round_clamp(v * inv);
    sum += qi;
    q[k] = static_cast<uint8_t>(qi + offset);
    if (lo) {
      const volatile float prod = static_cast<float>(qi) * scale;  // no FMA contraction: match the reference
      const float r = v - prod;
      lo[k] = static_cast<uint8_t>(round_clamp(r * inv2) + offset);
    }
  }
  if (scale_lo) *scale_lo = scale2;
  if (qsum) *qsum = sum;
  return scale;
}

// ---------------------------------------------------------------- AVX-512

// vmaxps drops a NaN in one operand, so NaN lanes are tracked in a mask (one compare per 16 values)
template <typename T>
FMK_AVX512 static inline float row_amax_avx512(const T* x, int64_t K) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = load16(x + k);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  if (k < K) {
    const __m512 v = load16(x + k, tail_mask(K - k));  // masked-off lanes: 0
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m);
}

FMK_AVX512 static inline __m512i round_clamp16(__m512 v) {
  __m512i q = _mm512_cvtps_epi32(v);  // MXCSR default: round to nearest even
  q = _mm512_max_epi32(q, _mm512_set1_epi32(-127));
  return _mm512_min_epi32(q, _mm512_set1_epi32(127));
}

template <typename T>
FMK_AVX512 static inline float quant_row_avx512(const T* x, int64_t K, uint8_t* q, int offset, uint8_t* lo,
                                                float* scale_lo, int32_t* qsum) {
  const float amax = row_amax_avx512(x, K);
  if (!std::isfinite(amax)) return quant_row_nonfinite(K, q, offset, lo, scale_lo, qsum);
  const float scale = amax / kQMax;
  const float inv = amax > 0.f ? kQMax / amax : 0.f;
  const float scale2 = scale / kLoDiv;
  const float inv2 = amax > 0.f ? kQMax * kLoDiv / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv), vs = _mm512_set1_ps(scale), vinv2 = _mm512_set1_ps(inv2);
  const __m512i voff = _mm512_set1_epi32(offset);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(K - k);
    const __m512 v = load16(x + k, m);
    const __m512i qi = round_clamp16(_mm512_mul_ps(v, vinv));  // masked-off lanes: 0
    vsum = _mm512_add_epi32(vsum, qi);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(qi, voff)));
    if (lo) {
      // residual = v - q * scale, rounded twice (mul, then sub) like the reference: keep them separate
      __m512 prod = _mm512_mul_ps(_mm512_cvtepi32_ps(qi), vs);
      __asm__("" : "+v"(prod));  // barrier against FMA contraction
      const __m512 r = _mm512_sub_ps(v, prod);
      const __m512i li = round_clamp16(_mm512_mul_ps(r, vinv2));
      _mm_mask_storeu_epi8(lo + k, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(li, voff)));
    }
  }
  if (scale_lo) *scale_lo = scale2;
  if (qsum) *qsum = _mm512_reduce_add_epi32(vsum);
  return scale;
}

// qsum (optional): sum_k q[k] of the (first-term, signed) codes
template <typename T>
static inline float quant_row(bool avx512, const T* x, int64_t K, uint8_t* q, int offset, uint8_t* lo = nullptr,
                              float* scale_lo = nullptr, int32_t* qsum = nullptr) {
  return avx512 ? quant_row_avx512(x, K, q, offset, lo, scale_lo, qsum)
                : quant_row_portable(x, K, q, offset, lo, scale_lo, qsum);
}

// Work split of the weight-only GEMMs (int4, int8 weight-only) over R rows and nblk16 16-column blocks: panels of
// up to nb_max blocks, and, when there are fewer than 4 panels per thread, rows cut into chunks of whole mr-row
// tiles. tile(m, rows, b0, nb): one tile of `rows` (<= mr) rows at m over blocks [b0, b0 + nb) (the VNNI
// micro-kernels); block(mb, me, b): rows [mb, me) of block b (the AVX2 / portable fallbacks).
template <class Tile, class Block>
void weight_panel_gemm(int64_t R, int64_t nblk16, int64_t nb_max, int64_t mr, bool vnni, Tile tile, Block block) {
  const int64_t npanel = (nblk16 + nb_max - 1) / nb_max;
  const int64_t nthr = at::get_num_threads();
  int64_t mchunks = 1;
  if (npanel < 4 * nthr && R > mr) mchunks = std::min<int64_t>((R + mr - 1) / mr, (4 * nthr + npanel - 1) / npanel);
  const int64_t mstep = round_up((R + mchunks - 1) / mchunks, mr);
  mchunks = (R + mstep - 1) / mstep;
  at::parallel_for(0, npanel * mchunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pn = t / mchunks, mc = t % mchunks;
      const int64_t mb = mc * mstep, me = std::min(R, mb + mstep);
      const int64_t b0 = pn * nb_max;
      const int nb = static_cast<int>(std::min<int64_t>(nb_max, nblk16 - b0));
      if (vnni) {
        for (int64_t m = mb; m < me; m += mr) tile(m, static_cast<int>(std::min<int64_t>(mr, me - m)), b0, nb);
      } else {
        for (int j = 0; j < nb; ++j) block(mb, me, b0 + j);
      }
    }
  });
}

}  // namespace fmk::cpu::quant
