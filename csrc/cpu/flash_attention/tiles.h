// fp32 register-tile micro-GEMMs, vectorized 2^x, and the softmax / backward row kernels (AVX-512 and
// portable), picked once per call through Kernels. Internal linkage: each translation unit that includes this
// compiles its own copy, as when all of flash attention was one file.
#pragma once

#include <algorithm>
#include <cmath>

#include "cpu/flash_attention/common.h"

namespace fmk::cpu::flash_attn {
namespace {

// ================================================================ AVX-512 fp32 kernels

// 2^x for x <= 128; x <= -126 (and -inf) gives 0 (no denormals). 2^f on [-0.5, 0.5] by a Chebyshev-fitted
// degree-5 polynomial (1.0e-7 relative, fp32 ulp level).
// NaN in, NaN out (a NaN score reaches the row like in SDPA): `live` is "not <= -126" (unordered: true) and vmaxps
// returns its second operand when either is NaN.
FMK_AVX512 static inline __m512 exp2_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLE_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.34004417095362e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.676046747499872e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550327190348713e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022107174899823e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472067218047e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000755330434f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// 2^x where the result is rounded to bf16 (P and dS of the bf16 tiles): 7.5e-5 relative, 26x under bf16's half
// ulp. Five instructions: f = x - floor(x) in [0, 1] (vreduceps), a degree-3 fit of 2^f (lawson-weighted
// minimax on [0, 1]), times 2^floor(x) (vscalefps). x = -inf gives 0 (vreduceps returns 0, vscalefps scales by
// 2^-inf); x below -149 underflows to 0, between -149 and -126 to bf16 denormals (so no compare or clamp).
// Valid for x <= 128 and not NaN (a NaN score stays NaN). Against exp2_ps's degree-3 form (compare, clamp,
// round, subtract, 3 FMAs, masked scale), with the scale folded into one fmsub, the bf16 fwd went 24.6 -> 23.8 ms
// (B4 H8 N1024 D64, 2 cores).
// x is capped at 64 (vminps keeps a NaN second operand): the callers' fused s * c - m is not rounded before the
// subtraction, so with |m| > 2^31 (scores ~1e9 and up) x could reach ulp(m) / 2 > 128 and give inf, then NaN rows
// where SDPA is finite.
FMK_AVX512 static inline __m512 exp2_bf16_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(64.0f), x);
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(0.07802420109510422f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22606705129146576f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958338618278503f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999251365661621f));
  return _mm512_scalef_ps(p, x);
}

// C (M x 16*NB) = A (M x K, row stride lda) * Bt (K x 16*NB, row stride ldb). MR x 32 register tiles.
template <int MR, int NV>
FMK_AVX512 static inline void abt_tile(int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb,
                                       float* C, int64_t ldc) {
  __m512 acc[MR * NV];  // in registers: loops fully unrolled (see abt_bf16_tile)
#pragma GCC unroll 16
  for (int x = 0; x < MR * NV; ++x) acc[x] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(Bt + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_fmadd_ps(a, b[v], acc[r * NV + v]);
    }
  }
#pragma GCC unroll 16
  for (int x = 0; x < MR * NV; ++x) _mm512_storeu_ps(C + (x / NV) * ldc + 16 * (x % NV), acc[x]);
}

template <int MR>
FMK_AVX512 static inline void abt_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt,
                                       int64_t ldb, float* C, int64_t ldc) {
  int64_t c = 0;
  for (; c + 32 <= N; c += 32) abt_tile<MR, 2>(K, A, lda, Bt + c, ldb, C + c, ldc);
  for (; c < N; c += 16) abt_tile<MR, 1>(K, A, lda, Bt + c, ldb, C + c, ldc);
}

FMK_AVX512 void gemm_abt_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt,
                                int64_t ldb, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= M; i += 8) abt_rows<8>(N, K, A + i * lda, lda, Bt, ldb, C + i * ldc, ldc);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 7: abt_rows<7>(N, K, a, lda, Bt, ldb, c, ldc); break;
    case 6: abt_rows<6>(N, K, a, lda, Bt, ldb, c, ldc); break;
    case 5: abt_rows<5>(N, K, a, lda, Bt, ldb, c, ldc); break;
    case 4: abt_rows<4>(N, K, a, lda, Bt, ldb, c, ldc); break;
    case 3: abt_rows<3>(N, K, a, lda, Bt, ldb, c, ldc); break;
    case 2: abt_rows<2>(N, K, a, lda, Bt, ldb, c, ldc); break;
    case 1: abt_rows<1>(N, K, a, lda, Bt, ldb, c, ldc); break;
    default: break;
  }
}

// C (M x N, N multiple of 16) += A (M x K; element (i, k) at A[i*si + k*sk]) * B (K x N, row stride ldb).
template <int MR, int NV>
FMK_AVX512 static inline void ab_tile(int64_t K, const float* A, int64_t si, int64_t sk, const float* B,
                                      int64_t ldb, float* C, int64_t ldc) {
  __m512 acc[MR * NV];
#pragma GCC unroll 16
  for (int x = 0; x < MR * NV; ++x) acc[x] = _mm512_loadu_ps(C + (x / NV) * ldc + 16 * (x % NV));
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * si + k * sk]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_fmadd_ps(a, b[v], acc[r * NV + v]);
    }
  }
#pragma GCC unroll 16
  for (int x = 0; x < MR * NV; ++x) _mm512_storeu_ps(C + (x / NV) * ldc + 16 * (x % NV), acc[x]);
}

template <int MR>
FMK_AVX512 static inline void ab_rows(int64_t N, int64_t K, const float* A, int64_t si, int64_t sk, const float* B,
                                      int64_t ldb, float* C, int64_t ldc) {
  int64_t c = 0;
  for (; c + 64 <= N; c += 64) ab_tile<MR, 4>(K, A, si, sk, B + c, ldb, C + c, ldc);
  switch ((N - c) / 16) {
    case 3: ab_tile<MR, 3>(K, A, si, sk, B + c, ldb, C + c, ldc); break;
    case 2: ab_tile<MR, 2>(K, A, si, sk, B + c, ldb, C + c, ldc); break;
    case 1: ab_tile<MR, 1>(K, A, si, sk, B + c, ldb, C + c, ldc); break;
    default: break;
  }
}

FMK_AVX512 void gemm_ab_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t si, int64_t sk,
                               const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) ab_rows<4>(N, K, A + i * si, si, sk, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) ab_rows<1>(N, K, A + i * si, si, sk, B, ldb, C + i * ldc, ldc);
}

// Whether x[0, n) (n multiple of 16) holds a NaN. vmaxps drops a NaN in one operand, so a NaN next to masked
// (-inf) scores can leave a row max of -inf: the rare "nothing visible" branches check with this.
FMK_AVX512 static inline bool any_nan_avx512(const float* x, int64_t n) {
  __mmask16 k = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    k |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return k != 0;
}

// One score row of a forward tile (n multiple of 16): t = s * c (c = softmax_scale: natural-log units); online
// softmax update of the running max m and sum l; s becomes p = e^(t - m_new) = 2^((t - m_new) log2(e)). Returns
// the factor the output row must be scaled by. Natural units (one more multiply per score than log2 units) so that
// lse = m + ln(l) is what the backward subtracts, with no log2 <-> ln round trip: a row that sees one key gets
// p = 2^0 = 1 exactly in the backward (the round trip gave 1 +- 1e-5 at scores ~100: dv 31.8x PyTorch's error).
FMK_AVX512 float softmax_row_avx512(float* s, int64_t n, float c, float* m, float* l) {
  const __m512 vc = _mm512_set1_ps(c);
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(s + j), vc);
    _mm512_storeu_ps(s + j, t);
    mx = _mm512_max_ps(mx, t);
  }
  // Lazy rescaling: keep the running max unless the tile's max exceeds it by more than kRescale (log2 units),
  // so most tiles skip the output rescale; p <= 2^kRescale stays exact in fp32 and the final 1/l is unchanged.
  // Non-finite scores (SDPA's semantics): a NaN score makes p, l and the row NaN (exp2_ps keeps NaN; a NaN
  // tile_max makes alpha NaN); a +inf score makes m = +inf and p = 2^(inf - inf) = NaN; a row whose scores are
  // all -inf (masked or not) gives zeros.
  const float tile_max = _mm512_reduce_max_ps(mx);
  float alpha = 1.0f;
  if (tile_max > *m + kRescale * kLn2 || *m == kNegInf) {
    if (tile_max == kNegInf && !any_nan_avx512(s, n)) {  // nothing visible yet on this row
      std::fill(s, s + n, 0.0f);
      return 1.0f;
    }
    alpha = std::exp2((*m - tile_max) * kLog2e);  // 0 when *m == -inf
    *m = tile_max;
  }
  const __m512 vm = _mm512_set1_ps(*m), vl = _mm512_set1_ps(kLog2e);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 p = exp2_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm), vl));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  *l = *l * alpha + _mm512_reduce_add_ps(sum);
  return alpha;
}

FMK_AVX512 void scale_row_avx512(float* x, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), va));
}

// Backward row: s := p = e^((s * c - lse) - corr) (c = softmax_scale, lse natural; s * c rounded as in the forward,
// so a row's p reproduce the forward's; corr: 0, or the row-mass correction of a row with a large |lse|, see
// lse_corrections); dp := p * (dp - delta). lse = +inf on rows that see no key.
FMK_AVX512 void bwd_row_avx512(float* s, float* dp, int64_t n, float c, float lse, float corr, float delta) {
  const __m512 vc = _mm512_set1_ps(c), vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(delta);
  const __m512 vlog2e = _mm512_set1_ps(kLog2e), vcorr = _mm512_set1_ps(corr);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 t = _mm512_sub_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), vc), vl), vcorr);
    const __m512 p = exp2_ps(_mm512_mul_ps(t, vlog2e));
    _mm512_storeu_ps(s + j, p);
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), vd)));
  }
}

// sum_j e^(s_j * c - lse) over a backward row's scores, with s * c - lse rounded as bwd_row_avx512 rounds it,
// summed in fp64 (lse_corrections: rows with a large |lse|).
FMK_AVX512 double row_mass_avx512(const float* s, int64_t n, float c, float lse) {
  const __m512 vc = _mm512_set1_ps(c), vl = _mm512_set1_ps(lse), vlog2e = _mm512_set1_ps(kLog2e);
  __m512d acc = _mm512_setzero_pd();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 t = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), vc), vl);
    const __m512 e = exp2_ps(_mm512_mul_ps(t, vlog2e));
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
  }
  return _mm512_reduce_add_pd(acc);
}

// ================================================================ portable kernels

void gemm_abt_portable(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb,
                       float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    std::fill(c, c + N, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * lda + k];
      const float* b = Bt + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

void gemm_ab_portable(int64_t M, int64_t N, int64_t K, const float* A, int64_t si, int64_t sk, const float* B,
                      int64_t ldb, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * si + k * sk];  // no skip of a == 0: 0 * NaN is NaN, as in the AVX-512 kernel
      const float* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// NaN-sticky max (std::max drops a NaN second argument): a row whose scores are all NaN must not look empty.
inline float max_nan(float a, float b) { return (b > a || std::isnan(b)) && !std::isnan(a) ? b : a; }

float softmax_row_portable(float* s, int64_t n, float c, float* m, float* l) {
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= c;
    mx = max_nan(mx, s[j]);
  }
  const float m_new = max_nan(*m, mx);
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp2((s[j] - m_new) * kLog2e);
    sum += s[j];
  }
  const float alpha = std::exp2((*m - m_new) * kLog2e);
  *l = *l * alpha + sum;
  *m = m_new;
  return alpha;
}

void scale_row_portable(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

void bwd_row_portable(float* s, float* dp, int64_t n, float c, float lse, float corr, float delta) {
  for (int64_t j = 0; j < n; ++j) {
    const float t = s[j] * c;  // rounded as in the forward (no fused multiply-subtract)
    const float p = std::exp2(((t - lse) - corr) * kLog2e);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
}

double row_mass_portable(const float* s, int64_t n, float c, float lse) {
  double mass = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const float t = s[j] * c;
    mass += std::exp2((t - lse) * kLog2e);
  }
  return mass;
}

struct Kernels {
  void (*abt)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t);
  void (*ab)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
  float (*softmax_row)(float*, int64_t, float, float*, float*);
  void (*scale_row)(float*, int64_t, float);
  void (*bwd_row)(float*, float*, int64_t, float, float, float, float);
  double (*row_mass)(const float*, int64_t, float, float);
  bool vec;  // AVX-512 stores (store_rows)
};

Kernels kernels() {
  if (use_avx512())
    return {gemm_abt_avx512, gemm_ab_avx512, softmax_row_avx512, scale_row_avx512, bwd_row_avx512, row_mass_avx512, true};
  return {gemm_abt_portable, gemm_ab_portable, softmax_row_portable, scale_row_portable, bwd_row_portable, row_mass_portable,
          false};
}

}  // namespace
}  // namespace fmk::cpu::flash_attn
