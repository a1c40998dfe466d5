// Flash attention forward and backward on CPU: O = softmax(Q K^T * scale + mask) V, tile by tile with an
// online softmax; the N x N score matrix is never formed (one BQ x BK tile per thread).
//
// q: (B, Hq, Nq, D), k/v: (B, Hkv, Nk, D), any strides, fp32/bf16/fp16; Hq % Hkv == 0 (GQA: query head h
// reads kv head h / (Hq / Hkv), no copies). Mask (FlashAttention-2, bottom-right aligned): query i sees key j
// when i + Nk - Nq - left <= j <= i + Nk - Nq + right (a negative bound is unbounded). Key blocks a query
// block cannot see are skipped; only blocks on the mask's edges are masked element by element.
// lse (B, Hq, Nq) fp32 natural-log log-sum-exp; rows that see no key give O = 0, lse = -inf.
//
// Compute: fp32 accumulation everywhere. Operands are re-laid out once per call (linear in N; the bf16 pair
// panels by AVX-512 loops, 2.7 -> ~0.3 ms per (4, 8, 1024, 64) tensor on 1 core vs ATen's permute copy):
//  - fp32 path (fp32 and fp16 inputs, or no AVX512-BF16): K^T / V^T packed per key block as (D, BK) panels
//    so Q K^T is a register-blocked 8 x 32 broadcast-FMA micro-kernel; P V, P^T dO, dS^T Q, dS K are 4 x 64
//    broadcast-FMA micro-kernels on row-major operands.
//  - bf16 path (bf16 inputs with AVX512-BF16): the same tiles with vdpbf16ps on operands packed into
//    (pair, 16 lanes, 2) layouts; P and dS are rounded to bf16 for their GEMMs (as FlashAttention-2 does). On
//    tiles without masked pairs the softmax (forward) and P^T / dS^T (backward) are computed from the score
//    accumulators in registers. The 8 x 32 vdpbf16ps tile runs at ~217 GFLOP/s per core in L1 (the chip's
//    peak: one 512-bit vdpbf16ps per cycle); the whole fwd+bwd reaches ~80% of that.
// exp is a vectorized 2^x (round + Chebyshev-fitted polynomial + vscalefps); the online softmax rescales the
// output only when a row's max grows by more than 2^8 (lazy rescaling).
// Forward: parallel over (batch, query head, query block); Nq <= 16 takes the split-K decoding
// path instead (see fwd_decode). Backward: parallel over (batch, kv head, key chunk); each task owns its dK/dV
// rows (summed over the query heads of its GQA group). With one chunk per (batch, kv head) (B * Hkv >= 16) a task
// owns its heads' dQ too and writes it directly; otherwise key blocks are dealt round-robin to G chunks
// (balanced under causal masks), each writing an fp32 dQ partial, summed in a fixed order afterwards. No atomic
// accumulation (tasks come from a shared counter, but each writes only its own outputs): bit-identical results
// run to run.
// Measured (2 cores Zen 4, B=4 H=8 N=1024 D=64, fwd+bwd vs F.scaled_dot_product_attention in the same run):
// see benchmarks/bench_attention.py and README.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

constexpr int64_t BQ = 64;  // query rows per tile
constexpr int64_t BK = 64;  // keys per tile (multiple of 32)
static_assert(BQ == BK, "the bf16 backward packs Q^T panels with the K^T blocking");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kRescale = 8.0f;  // lazy online-softmax rescale threshold (log2 units)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Which keys each query row sees (FlashAttention-2 bottom-right alignment), within keys [klo, khi) (a padded
// batch's valid keys; [0, nk) otherwise).
struct Mask {
  int64_t nq, nk, off, left, right;  // off = nk - nq; left/right < 0: unbounded
  int64_t klo = 0, khi = -1;         // khi < 0: nk
  static Mask of(int64_t nq, int64_t nk, int64_t left, int64_t right, int64_t klo = 0, int64_t khi = -1) {
    Mask m{nq, nk, nk - nq, left, right, klo, khi < 0 ? nk : khi};
    return m;
  }
  int64_t lo(int64_t i) const { return std::max<int64_t>(klo, left < 0 ? 0 : i + off - left); }
  int64_t hi(int64_t i) const { return std::min<int64_t>(khi, right < 0 ? nk : i + off + right + 1); }
  // Query rows [first, second) that see at least one key of [j0, j1) (empty: first >= second).
  std::pair<int64_t, int64_t> rows_of_keys(int64_t j0, int64_t j1) const {
    j0 = std::max(j0, klo);
    j1 = std::min(j1, khi);
    if (j1 <= j0) return {0, 0};
    return {right < 0 ? 0 : std::max<int64_t>(0, j0 - off - right), left < 0 ? nq : std::min<int64_t>(nq, j1 - off + left)};
  }
  // True when every (row in [r0, r1), key in [j0, j0 + BK)) pair is visible (and j0 + BK <= nk).
  bool full(int64_t r0, int64_t r1, int64_t j0) const {
    return j0 + BK <= nk && lo(r1 - 1) <= j0 && hi(r0) >= j0 + BK;
  }
  // Sets the scores of invisible pairs to -inf (tile rows r0.., keys j0..j0+BK).
  void apply(float* s, int64_t r0, int64_t m, int64_t j0) const {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t a = std::clamp<int64_t>(lo(r0 + i) - j0, 0, BK);
      const int64_t b = std::clamp<int64_t>(hi(r0 + i) - j0, 0, BK);
      float* row = s + i * BK;
      if (b <= a) {
        std::fill(row, row + BK, kNegInf);
        continue;
      }
      std::fill(row, row + a, kNegInf);
      std::fill(row + b, row + BK, kNegInf);
    }
  }
  // Same on a transposed tile st (BK keys x BQ queries, row-major): key j0 + j, queries r0 + i.
  void apply_t(float* st, int64_t r0, int64_t j0) const {
    for (int64_t j = 0; j < BK; ++j) {
      const auto [qa, qb] = rows_of_keys(j0 + j, j0 + j + 1);
      const int64_t a = std::clamp<int64_t>(qa - r0, 0, BQ);
      const int64_t b = std::clamp<int64_t>(qb - r0, 0, BQ);
      float* row = st + j * BQ;
      if (b <= a) {
        std::fill(row, row + BQ, kNegInf);
        continue;
      }
      std::fill(row, row + a, kNegInf);
      std::fill(row + b, row + BQ, kNegInf);
    }
  }
};

// A causal diagonal block (fp32 paths): when the first kHalf query rows of a full BQ-row tile see no key past
// the block's first kHalf, their scores, softmax and products run over kHalf keys: 3/4 of the block's work.
// B 8, H 6, N 256, D 64 causal (10 blocks per head, 4 of them diagonal), 2 threads, medians of 40 alternating
// calls: fwd 4.04 -> 3.84 ms, bwd 8.33 -> 7.84 ms. (Also splits a last key block with <= kHalf keys left.)
constexpr int64_t kHalf = BK / 2;
inline bool diagonal_split(const Mask& mask, int64_t r0, int64_t m, int64_t j0) {
  return m == BQ && mask.hi(r0 + kHalf - 1) <= j0 + kHalf;
}

// Tasks are handed out from a shared counter (one at::parallel_for index per thread) rather than split
// statically: on a shared machine a descheduled thread no longer holds back half of the work. Each task writes
// only its own outputs, so results do not depend on which thread ran it (bit-identical run to run).
inline int64_t workers(int64_t ntask) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask)); }

// ================================================================ AVX-512 fp32 kernels

// 2^x for x <= 128; x <= -126 (and -inf) gives 0 (no denormals). 2^f on [-0.5, 0.5] by a Chebyshev-fitted
// degree-5 polynomial (1.0e-7 relative, fp32 ulp level).
FMK_AVX512 static inline __m512 exp2_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
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
FMK_AVX512 static inline __m512 exp2_bf16_ps(__m512 x) {
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

// One score row of a forward tile (n multiple of 16): t = s * c (log2 units); online softmax update of the
// running max m and sum l; s becomes p = 2^(t - m_new). Returns the factor the output row must be scaled by.
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
  const float tile_max = _mm512_reduce_max_ps(mx);
  float alpha = 1.0f;
  if (tile_max > *m + kRescale || *m == kNegInf) {
    if (tile_max == kNegInf) {  // nothing visible yet on this row
      std::fill(s, s + n, 0.0f);
      return 1.0f;
    }
    alpha = std::exp2(*m - tile_max);  // 0 when *m == -inf
    *m = tile_max;
  }
  const __m512 vm = _mm512_set1_ps(*m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
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

// Backward row: s := p = 2^(s * c - lse2); dp := p * (dp - delta). lse2 = +inf on rows that see no key.
FMK_AVX512 void bwd_row_avx512(float* s, float* dp, int64_t n, float c, float lse2, float delta) {
  const __m512 vc = _mm512_set1_ps(c), vl = _mm512_set1_ps(lse2), vd = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 p = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vc, vl));
    _mm512_storeu_ps(s + j, p);
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), vd)));
  }
}

// ================================================================ AVX-512 BF16 kernels
// Pair layouts: a "pair panel" of a (K x N) operand stores, for each k pair, N lanes of (x[2kp][n], x[2kp+1][n]).
// vdpbf16ps(acc, a, b): acc[n] += a[2n] * b[2n] + a[2n+1] * b[2n+1].

using bf16 = c10::BFloat16;

// C (M x N, fp32) (+)= A (M x K bf16, K even) * Bp (pair panel of K x N, lane stride ldb). A's pair (row r,
// pair kp) at A + r*lda + kp*lpa. LDA / LPA > 0 fix those strides at compile time: the MR broadcasts of a k step
// then address A by immediate offsets from one pointer. With runtime strides GCC held MR row pointers and
// spilled the C row pointers to xmm registers; the prologue/epilogue was ~15% of the tile's cycles (K2 = 32).
template <int MR, int NV, int64_t LDA, int64_t LPA>
FMK_AVX512_BF16 static inline void abt_bf16_tile(int64_t K2, int64_t nblk, int64_t ablk, const bf16* A, int64_t lda_rt,
                                                 int64_t lpa_rt, const bf16* Bp, int64_t ldb, float* C, int64_t ldc,
                                                 bool accumulate) {
  const int64_t lda = LDA > 0 ? LDA : lda_rt, lpa = LPA > 0 ? LPA : lpa_rt;
  // Accumulators live in registers for the whole K loop (MR * NV <= 16 zmm); fully unrolled over r and v so
  // GCC keeps them there (with arrays it split the loop and re-broadcast A once per output vector).
  __m512 acc[MR * NV];
#pragma GCC unroll 16
  for (int x = 0; x < MR * NV; ++x)
    acc[x] = accumulate ? _mm512_loadu_ps(C + (x / NV) * ldc + 16 * (x % NV)) : _mm512_setzero_ps();
  const bf16* bp = Bp;
  for (int64_t blk = 0; blk < nblk; ++blk)
  for (const bf16 *a = A + blk * ablk, *a_end = a + K2 * lpa; a != a_end; a += lpa, bp += 2 * ldb) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bp + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_dpbf16_ps(acc[r * NV + v], av, b[v]);
    }
  }
#pragma GCC unroll 16
  for (int x = 0; x < MR * NV; ++x) _mm512_storeu_ps(C + (x / NV) * ldc + 16 * (x % NV), acc[x]);
}

template <int MR, int NVMAX, int64_t LDA, int64_t LPA>
FMK_AVX512_BF16 static inline void abt_bf16_rows(int64_t N, int64_t K2, int64_t nblk, int64_t ablk, const bf16* A,
                                                 int64_t lda, int64_t lpa, const bf16* Bp, int64_t ldb, float* C,
                                                 int64_t ldc, bool accumulate) {
  int64_t c = 0;
  for (; c + 16 * NVMAX <= N; c += 16 * NVMAX)
    abt_bf16_tile<MR, NVMAX, LDA, LPA>(K2, nblk, ablk, A, lda, lpa, Bp + 2 * c, ldb, C + c, ldc, accumulate);
  for (; c < N; c += 16)
    abt_bf16_tile<MR, 1, LDA, LPA>(K2, nblk, ablk, A, lda, lpa, Bp + 2 * c, ldb, C + c, ldc, accumulate);
}

// C (M x N) (+)= A * B with vdpbf16ps: A's pair (row r, pair kp) at A + r*lda + kp*lpa (lpa = 2: row-major
// pairs), B a pair panel (K2 pairs x N lanes, lane stride ldb). Used for Q K^T (B = K^T panel), P V, P^T dO,
// dS^T Q and dS K. N multiple of 16. LDA / LPA: compile-time A strides (0: use lda / lpa).
// Blocked A: the K pairs come in nblk blocks of K2 pairs, A's block b at A + b * ablk (same row / pair strides
// inside each block); Bp's pairs continue across blocks. dV += P^T dO and dK += dS^T Q take all query blocks of a
// key block in one call, so the fp32 C tile is loaded and stored once per key block instead of once per query
// block (K2 = 32 -> 32 * nblk pairs per load/store).
template <int64_t LDA = 0, int64_t LPA = 0>
FMK_AVX512_BF16 void gemm_bf16_blocked_avx512(int64_t M, int64_t N, int64_t K2, int64_t nblk, int64_t ablk,
                                              const bf16* A, int64_t lda, int64_t lpa, const bf16* Bp, int64_t ldb,
                                              float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  const int64_t la = LDA > 0 ? LDA : lda;
  if (N <= 64) {  // 8 x 32 and 4 x 64 tiles measured the same here (2 cores Zen 4)
    for (; i + 8 <= M; i += 8)
      abt_bf16_rows<8, 2, LDA, LPA>(N, K2, nblk, ablk, A + i * la, lda, lpa, Bp, ldb, C + i * ldc, ldc, accumulate);
  } else {
    for (; i + 4 <= M; i += 4)
      abt_bf16_rows<4, 4, LDA, LPA>(N, K2, nblk, ablk, A + i * la, lda, lpa, Bp, ldb, C + i * ldc, ldc, accumulate);
  }
  for (; i < M; ++i)
    abt_bf16_rows<1, 4, LDA, LPA>(N, K2, nblk, ablk, A + i * la, lda, lpa, Bp, ldb, C + i * ldc, ldc, accumulate);
}

template <int64_t LDA = 0, int64_t LPA = 0>
FMK_AVX512_BF16 void gemm_bf16_avx512(int64_t M, int64_t N, int64_t K2, const bf16* A, int64_t lda, int64_t lpa,
                                      const bf16* Bp, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_bf16_blocked_avx512<LDA, LPA>(M, N, K2, 1, 0, A, lda, lpa, Bp, ldb, C, ldc, accumulate);
}

// One BK = 64 score row of the bf16 forward: online-softmax update of the running max m and the 16-lane row sum
// lv, the row of P out in bf16 (p), and the output row o rescaled when m moved. Row sums stay 16-lane vectors
// until the end, and the row max is reduced only when some lane exceeds m by kRescale (lazy rescaling, rare
// after the first tile): the two horizontal reductions per row and tile were ~1/3 of the tile's softmax time.
// t: the row's 4 vectors in log2 units (RAW = false), or raw Q K^T scores (RAW = true, needs c > 0 so that
// max(s) * c == max(s * c)), whose scale then folds into one fmsub per vector.
template <bool RAW>
FMK_AVX512_BF16 __attribute__((always_inline)) static inline void softmax_row_bf16(const __m512* t, __m512 vc, float* m,
                                                                                float* lv, float* o, int64_t Dp,
                                                                                bf16* p) {
  static_assert(BK == 64, "four vectors per score row");
  __m512 mx = _mm512_max_ps(_mm512_max_ps(t[0], t[1]), _mm512_max_ps(t[2], t[3]));
  if constexpr (RAW) mx = _mm512_mul_ps(mx, vc);
  float alpha = 1.0f;
  // *m == -inf: m + kRescale is -inf and any finite lane triggers; all lanes -inf: nothing visible yet.
  if (_mm512_cmp_ps_mask(mx, _mm512_set1_ps(*m + kRescale), _CMP_GT_OQ) != 0) {
    const float tile_max = _mm512_reduce_max_ps(mx);
    alpha = std::exp2(*m - tile_max);  // 0 when *m == -inf
    *m = tile_max;
  } else if (*m == kNegInf) {
    std::fill(p, p + BK, bf16(0.0f));
    return;
  }
  const __m512 vm = _mm512_set1_ps(*m);
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const __m512 e = exp2_bf16_ps(RAW ? _mm512_fmsub_ps(t[v], vc, vm) : _mm512_sub_ps(t[v], vm));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * v), (__m256i)_mm512_cvtneps_pbh(e));
  }
  if (alpha != 1.0f) {
    const __m512 va = _mm512_set1_ps(alpha);
    _mm512_storeu_ps(lv, _mm512_fmadd_ps(_mm512_loadu_ps(lv), va, sum));
    for (int64_t j = 0; j < Dp; j += 16) _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(o + j), va));
  } else {
    _mm512_storeu_ps(lv, _mm512_add_ps(_mm512_loadu_ps(lv), sum));
  }
}

// Forward tile (bf16 path, masked or partial tiles): softmax_row_bf16 on rows [0, M) of S (BK wide, -inf on
// masked pairs), P in bf16 (row-major, BK wide) for the P V product.
FMK_AVX512_BF16 void softmax_tile_bf16(float* S, int64_t M, float c, float* m, float* lv, float* O, int64_t Dp,
                                       bf16* P) {
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t i = 0; i < M; ++i) {
    __m512 t[BK / 16];
    for (int v = 0; v < BK / 16; ++v) t[v] = _mm512_mul_ps(_mm512_loadu_ps(S + i * BK + 16 * v), vc);
    softmax_row_bf16<false>(t, vc, m + i, lv + 16 * i, O + i * Dp, Dp, P + i * BK);
  }
}

// Q K^T fused with the softmax for full tiles (BQ rows, no masked pairs) and c > 0: 4-row x 64-key accumulator
// blocks (a whole score row in registers) go straight to softmax_row_bf16 (raw scores).
FMK_AVX512_BF16 void qk_softmax_fused_bf16(int64_t K2, const bf16* Q, int64_t ldq, const bf16* Ktp, float c, float* m,
                                           float* lv, float* O, int64_t Dp, bf16* P) {
  static_assert(BK == 64, "one 4 x 64 register block per row group");
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t i0 = 0; i0 < BQ; i0 += 4) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int x = 0; x < 16; ++x) acc[x] = _mm512_setzero_ps();
    const bf16* A = Q + i0 * ldq;
    for (int64_t kp = 0; kp < K2; ++kp) {
      __m512bh b[4];
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) b[v] = (__m512bh)_mm512_loadu_si512(Ktp + (kp * BK + 16 * v) * 2);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        int32_t pair;
        std::memcpy(&pair, A + r * ldq + 2 * kp, 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) acc[4 * r + v] = _mm512_dpbf16_ps(acc[4 * r + v], a, b[v]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + r;
      softmax_row_bf16<true>(acc + 4 * r, vc, m + i, lv + 16 * i, O + i * Dp, Dp, P + i * BK);
    }
  }
}

// l[i] = sum of the 16 lanes of lv[i].
FMK_AVX512 void reduce_rows16_avx512(const float* lv, int64_t M, float* l) {
  for (int64_t i = 0; i < M; ++i) l[i] = _mm512_reduce_add_ps(_mm512_loadu_ps(lv + 16 * i));
}

// Two keys (rows j, j + 1 = 2 jp, 2 jp + 1) x 16 queries (columns i..i+15) of the transposed backward tile:
// P^T = 2^(S^T c - lse2), dS^T = P^T (dP^T - delta) from the fp32 scores s0/s1 and dP^T values d0/d1 (vl, vd:
// the 16 columns' lse2 and delta). Writes P^T and dS^T in bf16 (BK x BQ, row-major) and dS as an A operand for
// dS K: Z[jp][i] = (dS^T[2jp][i], dS^T[2jp+1][i]) (pairs over keys, row i at stride 2, pair at 2*BQ).
FMK_AVX512_BF16 __attribute__((always_inline)) static inline void bwd_key_pair_bf16(
    __m512 s0, __m512 s1, __m512 d0, __m512 d1, __m512 vc, __m512 vl, __m512 vd, int64_t jp, int64_t i, bf16* PT,
    bf16* dST, bf16* Z) {
  alignas(64) static const int16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512 s[2] = {s0, s1}, d[2] = {d0, d1};
  __m512 ds[2];
#pragma GCC unroll 2
  for (int u = 0; u < 2; ++u) {
    const int64_t j = 2 * jp + u;
    const __m512 p = exp2_bf16_ps(_mm512_fmsub_ps(s[u], vc, vl));
    ds[u] = _mm512_mul_ps(p, _mm512_sub_ps(d[u], vd));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(PT + j * BQ + i), (__m256i)_mm512_cvtneps_pbh(p));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dST + j * BQ + i), (__m256i)_mm512_cvtneps_pbh(ds[u]));
  }
  // cvtne2ps(b, a): lanes 0-15 = a, 16-31 = b; interleave to (a0, b0, a1, b1, ...).
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(ds[1], ds[0]);
  _mm512_storeu_si512(Z + jp * 2 * BQ + 2 * i, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), both));
}

// Backward tile, transposed (rows = BK keys, columns = BQ queries), from S^T and dP^T in memory (masked tiles):
// bwd_key_pair_bf16 over the whole tile.
FMK_AVX512_BF16 void bwd_tile_t_bf16(const float* ST, const float* dPT, float c, const float* lse2,
                                     const float* delta, bf16* PT, bf16* dST, bf16* Z) {
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t jp = 0; jp < BK / 2; ++jp) {
    for (int64_t i = 0; i < BQ; i += 16) {
      const float* s = ST + 2 * jp * BQ + i;
      const float* d = dPT + 2 * jp * BQ + i;
      bwd_key_pair_bf16(_mm512_loadu_ps(s), _mm512_loadu_ps(s + BQ), _mm512_loadu_ps(d), _mm512_loadu_ps(d + BQ), vc,
                        _mm512_loadu_ps(lse2 + i), _mm512_loadu_ps(delta + i), jp, i, PT, dST, Z);
    }
  }
}

// bwd_tile_t_bf16 fused into the S^T = K Q^T and dP^T = V dO^T products for tiles without masked pairs: each
// 4-key x 32-query block of both products is accumulated side by side in registers (16 zmm) and goes straight to
// P^T, dS^T and Z; neither S^T nor dP^T touches memory in fp32 (bwd 124 -> 118 ms, 1 core, B4 H8 N1024 D64).
// K / V rows at Kr / Vr (row stride ldk, K2 = Dp/2 pairs); Q^T / dO^T pair panels at Qt / dOt (lane stride BQ).
FMK_AVX512_BF16 void bwd_sdp_fused_bf16(int64_t K2, const bf16* Kr, const bf16* Vr, int64_t ldk, const bf16* Qt,
                                        const bf16* dOt, float c, const float* lse2, const float* delta, bf16* PT,
                                        bf16* dST, bf16* Z) {
  const __m512 vc = _mm512_set1_ps(c);
  for (int64_t j0 = 0; j0 < BK; j0 += 4) {
    for (int64_t i0 = 0; i0 < BQ; i0 += 32) {
      __m512 as[8], ad[8];  // [2 * r + v]: key j0 + r, queries i0 + 16 v ..
#pragma GCC unroll 8
      for (int x = 0; x < 8; ++x) as[x] = ad[x] = _mm512_setzero_ps();
      const bf16* K = Kr + j0 * ldk;
      const bf16* V = Vr + j0 * ldk;
      for (int64_t kp = 0; kp < K2; ++kp) {
        const __m512bh q0 = (__m512bh)_mm512_loadu_si512(Qt + (kp * BQ + i0) * 2);
        const __m512bh q1 = (__m512bh)_mm512_loadu_si512(Qt + (kp * BQ + i0) * 2 + 32);
        const __m512bh o0 = (__m512bh)_mm512_loadu_si512(dOt + (kp * BQ + i0) * 2);
        const __m512bh o1 = (__m512bh)_mm512_loadu_si512(dOt + (kp * BQ + i0) * 2 + 32);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          int32_t kpair, vpair;
          std::memcpy(&kpair, K + r * ldk + 2 * kp, 4);
          std::memcpy(&vpair, V + r * ldk + 2 * kp, 4);
          const __m512bh ak = (__m512bh)_mm512_set1_epi32(kpair), av = (__m512bh)_mm512_set1_epi32(vpair);
          as[2 * r] = _mm512_dpbf16_ps(as[2 * r], ak, q0);
          as[2 * r + 1] = _mm512_dpbf16_ps(as[2 * r + 1], ak, q1);
          ad[2 * r] = _mm512_dpbf16_ps(ad[2 * r], av, o0);
          ad[2 * r + 1] = _mm512_dpbf16_ps(ad[2 * r + 1], av, o1);
        }
      }
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) {
        const int64_t i = i0 + 16 * v;
        const __m512 vl = _mm512_loadu_ps(lse2 + i), vd = _mm512_loadu_ps(delta + i);
#pragma GCC unroll 2
        for (int r = 0; r < 4; r += 2)
          bwd_key_pair_bf16(as[2 * r + v], as[2 * (r + 1) + v], ad[2 * r + v], ad[2 * (r + 1) + v], vc, vl, vd,
                            (j0 + r) / 2, i, PT, dST, Z);
      }
    }
  }
}

// fp32 (M x N) -> bf16 rows (row stride ldo); N multiple of 16.
FMK_AVX512 void to_bf16_rows_avx512(const float* x, int64_t M, int64_t N, int64_t ldx, bf16* out, int64_t ldo) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; j += 16) store16(out + i * ldo + j, _mm512_loadu_ps(x + i * ldx + j));
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
      const float a = A[i * si + k * sk];
      if (a == 0.0f) continue;
      const float* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

float softmax_row_portable(float* s, int64_t n, float c, float* m, float* l) {
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= c;
    mx = std::max(mx, s[j]);
  }
  const float m_new = std::max(*m, mx);
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp2(s[j] - m_new);
    sum += s[j];
  }
  const float alpha = std::exp2(*m - m_new);
  *l = *l * alpha + sum;
  *m = m_new;
  return alpha;
}

void scale_row_portable(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

void bwd_row_portable(float* s, float* dp, int64_t n, float c, float lse2, float delta) {
  for (int64_t j = 0; j < n; ++j) {
    const float p = std::exp2(s[j] * c - lse2);
    s[j] = p;
    dp[j] = p * (dp[j] - delta);
  }
}

// Rows of a (B, H, N, D) operand with a unit stride along d: row r of head bh = b * H + h at
// p + b * sb + h * sh + r * sn. Lets the kernels read q, k, v, dO in place whatever their other strides (e.g.
// transposed (B, N, H, D) projections, where the copies cost ~1.3 ms each way per (8, 6, 256, 64) fp32 call).
template <typename T>
struct Rows {
  const T* p;
  int64_t H, sb, sh, sn;
  const T* row(int64_t bh, int64_t r) const { return p + (bh / H) * sb + (bh % H) * sh + r * sn; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return {x.const_data_ptr<T>(), x.size(1), x.stride(0), x.stride(1), x.stride(2)};
}

// delta[bh * N + i] = sum_d dO[bh][i][d] * O[bh][i][d] for flat rows [r0, r1) (fp32 accumulation).
template <typename T>
FMK_AVX512 void delta_rows_avx512(Rows<T> dO, Rows<T> O, int64_t N, float* delta, int64_t r0, int64_t r1,
                                  int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = dO.row(r / N, r % N);
    const T* o = O.row(r / N, r % N);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail_mask(D - d);
      acc = _mm512_fmadd_ps(load16(a + d, m), load16(o + d, m), acc);
    }
    delta[r] = _mm512_reduce_add_ps(acc);
  }
}

template <typename T>
void delta_rows_portable(Rows<T> dO, Rows<T> O, int64_t N, float* delta, int64_t r0, int64_t r1, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = dO.row(r / N, r % N);
    const T* o = O.row(r / N, r % N);
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc += static_cast<float>(a[d]) * static_cast<float>(o[d]);
    delta[r] = acc;
  }
}

struct Kernels {
  void (*abt)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t);
  void (*ab)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
  float (*softmax_row)(float*, int64_t, float, float*, float*);
  void (*scale_row)(float*, int64_t, float);
  void (*bwd_row)(float*, float*, int64_t, float, float, float);
  bool vec;  // AVX-512 stores (store_rows)
};

Kernels kernels() {
  if (use_avx512())
    return {gemm_abt_avx512, gemm_ab_avx512, softmax_row_avx512, scale_row_avx512, bwd_row_avx512, true};
  return {gemm_abt_portable, gemm_ab_portable, softmax_row_portable, scale_row_portable, bwd_row_portable, false};
}

// ================================================================ layouts (ATen, once per call)

// x (B, H, N, D) any strides/dtype -> `dtype` (B, H, Np, Dp) contiguous, zero padded (no copy when it already
// is). The zero fill only when there is padding (7 needless fills per layer cost 3.7 ms of a 550 ms bf16 step).
at::Tensor padded(const at::Tensor& x, int64_t Np, int64_t Dp, at::ScalarType dtype) {
  const int64_t N = x.size(2), D = x.size(3);
  if (x.scalar_type() == dtype && x.is_contiguous() && N == Np && D == Dp) return x;
  const auto opts = x.options().dtype(dtype);
  at::Tensor out = (N == Np && D == Dp) ? at::empty({x.size(0), x.size(1), Np, Dp}, opts)
                                        : at::zeros({x.size(0), x.size(1), Np, Dp}, opts);
  out.narrow(2, 0, N).narrow(3, 0, D).copy_(x);
  return out;
}
at::Tensor padded_f32(const at::Tensor& x, int64_t Np, int64_t Dp) { return padded(x, Np, Dp, at::kFloat); }
at::Tensor padded_bf16(const at::Tensor& x, int64_t Np, int64_t Dp) { return padded(x, Np, Dp, at::kBFloat16); }

// x as fp32 rows for the fp32 kernels: in place when it already is fp32 with N = Np, D = Dp and a unit d stride
// (any other strides), else a padded contiguous copy. `keep` holds whichever tensor the rows point into.
Rows<float> rows_f32(const at::Tensor& x, int64_t Np, int64_t Dp, at::Tensor& keep) {
  const bool in_place = x.scalar_type() == at::kFloat && x.size(2) == Np && x.size(3) == Dp && x.stride(3) == 1;
  keep = in_place ? x : padded_f32(x, Np, Dp);
  return rows_of<float>(keep);
}

// fp32 (B, H, Np, Dp) -> per key block (D, BK) panels: (B, H, Np/BK, Dp, BK).
at::Tensor block_transpose(const at::Tensor& x) {  // any input strides
  return x.unflatten(2, {x.size(2) / BK, BK}).transpose(3, 4).contiguous();
}

// bf16 (B, H, Np, Dp) -> pair panels over d, per key block: (B, H, Np/BK, Dp/2, BK, 2). A 32-bit transpose of
// each (BK, Dp/2) block; ATen's generic permute copy took 2.7 ms for (4, 8, 1024, 64) on 1 core, this ~0.3 ms.
template <int64_t P>
static inline void transpose_block_u32(const uint32_t* s, uint32_t* d, int64_t p_dyn) {
  const int64_t np = P > 0 ? P : p_dyn;
  for (int64_t p = 0; p < np; ++p)
    for (int64_t j = 0; j < BK; ++j) d[p * BK + j] = s[j * np + p];
}
FMK_AVX512 void pairs_over_d_avx512(const uint32_t* s, uint32_t* d, int64_t np) {
  if (np == 32)
    transpose_block_u32<32>(s, d, np);
  else
    transpose_block_u32<0>(s, d, np);
}
void pairs_over_d_portable(const uint32_t* s, uint32_t* d, int64_t np) { transpose_block_u32<0>(s, d, np); }

at::Tensor pairs_over_d(const at::Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), Np = x.size(2), Dp = x.size(3), nb = Np / BK, np = Dp / 2;
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kBFloat16 && Np % BK == 0 && Dp % 2 == 0);
  at::Tensor out = at::empty({B, H, nb, np, BK, 2}, x.options());
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.const_data_ptr<bf16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<bf16>());
  const bool vec = use_avx512();
  at::parallel_for(0, B * H * nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      if (vec)
        pairs_over_d_avx512(src + blk * BK * np, dst + blk * BK * np, np);
      else
        pairs_over_d_portable(src + blk * BK * np, dst + blk * BK * np, np);
    }
  });
  return out;
}

// bf16 (B, H, Np, Dp), Np even -> pair panels over rows: (B, H, Np/2, Dp, 2) (rows 2i and 2i+1 interleaved).
static inline void interleave_rows_u16(const uint16_t* s, uint32_t* d, int64_t rows2, int64_t Dp) {
  for (int64_t i = 0; i < rows2; ++i) {
    const uint16_t* a = s + 2 * i * Dp;
    const uint16_t* b = a + Dp;
    uint32_t* o = d + i * Dp;
    for (int64_t j = 0; j < Dp; ++j) o[j] = static_cast<uint32_t>(a[j]) | (static_cast<uint32_t>(b[j]) << 16);
  }
}
FMK_AVX512 void pairs_over_rows_avx512(const uint16_t* s, uint32_t* d, int64_t rows2, int64_t Dp) {
  interleave_rows_u16(s, d, rows2, Dp);
}
void pairs_over_rows_portable(const uint16_t* s, uint32_t* d, int64_t rows2, int64_t Dp) {
  interleave_rows_u16(s, d, rows2, Dp);
}

at::Tensor pairs_over_rows(const at::Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), Np = x.size(2), Dp = x.size(3);
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kBFloat16 && Np % 2 == 0);
  at::Tensor out = at::empty({B, H, Np / 2, Dp, 2}, x.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr<bf16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<bf16>());
  const bool vec = use_avx512();
  const int64_t chunk = 32;  // row pairs per work item
  const int64_t total = B * H * Np / 2, nchunks = (total + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * chunk, n = std::min(chunk, total - i0);
      if (vec)
        pairs_over_rows_avx512(src + 2 * i0 * Dp, dst + i0 * Dp, n, Dp);
      else
        pairs_over_rows_portable(src + 2 * i0 * Dp, dst + i0 * Dp, n, Dp);
    }
  });
  return out;
}

// dst[i][j] = src[i][j] * mul for i < m, j < d (fp32 -> T, row strides lds / ldd).
template <typename T>
FMK_AVX512 void store_rows_avx512(const float* src, int64_t lds, int64_t m, int64_t d, float mul, T* dst,
                                  int64_t ldd) {
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < m; ++i) {
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) store16(dst + i * ldd + j, _mm512_mul_ps(_mm512_loadu_ps(src + i * lds + j), vm));
    if (j < d) {
      const __mmask16 k = tail_mask(d - j);
      store16(dst + i * ldd + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + i * lds + j), vm), k);
    }
  }
}

template <typename T>
void store_rows(bool vec, const float* src, int64_t lds, int64_t m, int64_t d, float mul, T* dst, int64_t ldd) {
  if (vec) return store_rows_avx512(src, lds, m, d, mul, dst, ldd);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < d; ++j) dst[i * ldd + j] = static_cast<T>(src[i * lds + j] * mul);
}

// ================================================================ checks

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (B, H, N, D), got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": q must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k must have q's batch and head dim, got q ",
              q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": q's heads (", q.size(1),
              ") must be a multiple of k's heads (", k.size(1), ")");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256, op, ": head dim must be in [1, 256], got ", q.size(3));
}

bool use_bf16_path(const at::Tensor& q) { return q.scalar_type() == at::kBFloat16 && use_avx512_bf16(); }

// ================================================================ segments
// Every kernel below runs over a list of segments: one attention problem each, on rows of (B, H, N, D)-shaped
// operands. The dense op has one segment per batch entry; the varlen op views its packed (total, H, D) operands
// as (1, H, total, D) and has one segment per sequence (cu_seqlens); a padded batch with per-entry key ranges
// keeps the dense layout with a key range in each segment's mask.
struct Seg {
  int64_t b;    // batch index in the (B, H, ...) operands
  int64_t q0;   // first query row in the unpadded q-side rows (q, out, lse, delta, dq)
  int64_t qp0;  // first query row in the padded q-side buffers (bf16 backward; multiple of BQ)
  int64_t nq;
  int64_t k0;   // first key row in the padded key buffers (multiple of BK)
  int64_t ko;   // first key row in the unpadded k-side rows (k, v, dk, dv)
  int64_t nk;
  Mask mask;
  int64_t nqb() const { return (nq + BQ - 1) / BQ; }
  int64_t nkb() const { return (nk + BK - 1) / BK; }
};

// Larger problems first, so that the shared task counter does not end on one long sequence.
void order_by_cost(std::vector<Seg>& segs) {
  std::stable_sort(segs.begin(), segs.end(), [](const Seg& a, const Seg& b) { return a.nq * a.nk > b.nq * b.nk; });
}

// Writable rows of a (B, H, N, D) view with a unit d stride: row r of (b, h) at p + b * sb + h * sh + r * sn.
template <typename T>
struct OutRows {
  T* p;
  int64_t sb, sh, sn;
  T* row(int64_t b, int64_t h, int64_t r) const { return p + b * sb + h * sh + r * sn; }
};
template <typename T>
OutRows<T> out_rows(at::Tensor& x) {
  return {x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2)};
}

// x (B, H, N, D) any strides (unit d stride) -> `dtype` (B, H, NP, Dp) contiguous, each segment's rows
// [src, src + n) copied to [dst, dst + n), zero elsewhere. keys: the key side (ko -> k0; segments padded to BK
// rows), else the query side (q0 -> qp0; padded to BQ). One pass, row by row, parallel over (segment, head):
// ATen's copy of the transposed (total, H, D) view with a zero fill took ~2x longer (8 x 1024 rows, H8 D64).
template <typename T, typename U>
void pack_rows(const T* src, int64_t ssb, int64_t ssh, int64_t ssn, const std::vector<Seg>& segs, bool keys,
               int64_t H, int64_t NP, int64_t D, int64_t Dp, U* dst) {
  at::parallel_for(0, int64_t(segs.size()) * H, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const Seg& s = segs[task / H];
      const int64_t h = task % H, n = keys ? s.nk : s.nq, rows = round_up(n, keys ? BK : BQ);
      const T* sp = src + s.b * ssb + h * ssh + (keys ? s.ko : s.q0) * ssn;
      U* dp = dst + ((s.b * H + h) * NP + (keys ? s.k0 : s.qp0)) * Dp;
      for (int64_t r = 0; r < rows; ++r) {
        U* d = dp + r * Dp;
        int64_t j = 0;
        if (r < n) {
          const T* x = sp + r * ssn;
          if constexpr (std::is_same_v<T, U>) {
            std::memcpy(d, x, D * sizeof(T));
            j = D;
          } else {
            for (; j < D; ++j) d[j] = static_cast<U>(static_cast<float>(x[j]));
          }
        }
        for (; j < Dp; ++j) d[j] = U(0.0f);
      }
    }
  });
}

at::Tensor pack_segments(const at::Tensor& x0, const std::vector<Seg>& segs, bool keys, int64_t NP, int64_t Dp,
                         at::ScalarType dtype) {
  const at::Tensor x = x0.stride(3) == 1 ? x0 : x0.contiguous();
  const int64_t B = x.size(0), H = x.size(1), D = x.size(3);
  int64_t covered = 0;
  for (const Seg& s : segs) covered += round_up(keys ? s.nk : s.nq, keys ? BK : BQ);
  at::Tensor out = covered == B * NP ? at::empty({B, H, NP, Dp}, x.options().dtype(dtype))
                                     : at::zeros({B, H, NP, Dp}, x.options().dtype(dtype));
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "pack_segments", [&] {
    const scalar_t* sp = x.const_data_ptr<scalar_t>();
    if (dtype == at::kFloat)
      pack_rows<scalar_t, float>(sp, x.stride(0), x.stride(1), x.stride(2), segs, keys, H, NP, D, Dp,
                                 out.data_ptr<float>());
    else
      pack_rows<scalar_t, bf16>(sp, x.stride(0), x.stride(1), x.stride(2), segs, keys, H, NP, D, Dp,
                                out.data_ptr<bf16>());
  });
  return out;
}

// True when every segment's keys already sit where the padded key layout puts them (each sequence a whole
// number of key blocks): the fp32 path then reads k / v in place, as for a dense batch.
bool keys_in_place(const std::vector<Seg>& segs, int64_t NK, int64_t NKP) {
  if (NK != NKP) return false;
  for (const Seg& s : segs)
    if (s.k0 != s.ko || s.nk % BK != 0) return false;
  return true;
}

// Segment tables. dense: one per batch entry, key range [kstart[b], kend[b]) when given (else all keys).
// B * one (nq, nk) problem; padded buffers have round_up(nk, BK) key rows and round_up(nq, BQ) query rows.
std::vector<Seg> dense_segments(int64_t B, int64_t Nq, int64_t Nk, int64_t left, int64_t right,
                                const int32_t* kstart = nullptr, const int32_t* kend = nullptr) {
  std::vector<Seg> segs(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t klo = kstart ? kstart[b] : 0, khi = kend ? kend[b] : Nk;
    segs[b] = Seg{b, 0, 0, Nq, 0, 0, Nk, Mask::of(Nq, Nk, left, right, klo, khi)};
  }
  return segs;
}

// varlen: sequence s has queries [cq[s], cq[s+1]) and keys [ck[s], ck[s+1]) of the packed operands (checked
// here again, so that a bad table cannot make a kernel read out of bounds). Returns the padded row counts.
std::vector<Seg> varlen_segments(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t Tq, int64_t Tk, int64_t left,
                                 int64_t right, int64_t* NQP, int64_t* NKP, const char* op) {
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt, op,
              ": cu_seqlens_q and cu_seqlens_k must be int32");
  TORCH_CHECK(cu_q.device().is_cpu() && cu_k.device().is_cpu(), op, ": cu_seqlens must be CPU tensors");
  TORCH_CHECK(cu_q.dim() == 1 && cu_k.dim() == 1 && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1, op,
              ": cu_seqlens_q and cu_seqlens_k must be 1-D of the same length batch + 1, got ", cu_q.sizes(), " and ",
              cu_k.sizes());
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* pq = cq.const_data_ptr<int32_t>();
  const int32_t* pk = ck.const_data_ptr<int32_t>();
  const int64_t S = cq.numel() - 1;
  TORCH_CHECK(pq[0] == 0 && pk[0] == 0 && pq[S] == Tq && pk[S] == Tk, op,
              ": cu_seqlens must start at 0 and end at the total rows (", Tq, " queries, ", Tk, " keys)");
  std::vector<Seg> segs;
  segs.reserve(S);
  int64_t qp = 0, kp = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t nq = int64_t(pq[s + 1]) - pq[s], nk = int64_t(pk[s + 1]) - pk[s];
    TORCH_CHECK(nq >= 0 && nk >= 0, op, ": cu_seqlens must be non-decreasing (sequence ", s, ")");
    segs.push_back(Seg{0, pq[s], qp, nq, kp, pk[s], nk, Mask::of(nq, nk, left, right)});
    qp += round_up(nq, BQ);
    kp += round_up(nk, BK);
  }
  *NQP = std::max<int64_t>(qp, BQ);
  *NKP = std::max<int64_t>(kp, BK);
  return segs;
}

// ================================================================ forward

struct FwdTask {
  int64_t B, Hq, Hkv, NQ, NKP, nkb, D, Dp;  // NQ: q-side rows per head; NKP: padded key rows per head
  bool qpacked = false;  // bf16 path: Q rows packed per segment (at qp0) rather than at q0
  std::vector<Seg> segs;
  std::vector<int64_t> start;  // first task of each segment (Hq * nqb tasks each), then the total
  float c;                     // softmax_scale * log2(e)
  void plan() {
    order_by_cost(segs);
    start.assign(1, 0);
    for (const Seg& s : segs) start.push_back(start.back() + Hq * s.nqb());
  }
  // task -> (segment, query head, query block); blocks of a head alternate cheap and costly causal ones.
  const Seg& locate(int64_t task, int64_t* h, int64_t* qb) const {
    const int64_t si = std::upper_bound(start.begin(), start.end(), task) - start.begin() - 1;
    const Seg& s = segs[si];
    const int64_t nqb = s.nqb(), local = task - start[si], z = local % nqb;
    *h = local / nqb;
    *qb = (z % 2 == 0) ? z / 2 : nqb - 1 - z / 2;
    return s;
  }
};

void fwd_finalize(float* O, int64_t Dp, const float* m, const float* l, int64_t M, float* lse, const Kernels& kn) {
  for (int64_t i = 0; i < M; ++i) {
    if (l[i] == 0.0f) {
      std::fill(O + i * Dp, O + (i + 1) * Dp, 0.0f);
      lse[i] = kNegInf;
    } else {
      kn.scale_row(O + i * Dp, Dp, 1.0f / l[i]);
      lse[i] = (m[i] + std::log2(l[i])) * kLn2;
    }
  }
}

template <typename T>
void fwd_fp32(const FwdTask& t, Rows<float> Qr, const float* Kt, Rows<float> Vr, OutRows<T> out, float* lse) {
  const Kernels kn = kernels();
  const int64_t grp = t.Hq / t.Hkv, ntask = t.start.back();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(ntask), 1, [&](int64_t, int64_t) {
    std::vector<float> S(BQ * BK), O(BQ * t.Dp), m(BQ), l(BQ);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      int64_t h, qb;
      const Seg& sg = t.locate(task, &h, &qb);
      const Mask& mask = sg.mask;
      const int64_t b = sg.b, bh = b * t.Hq + h, bhk = b * t.Hkv + h / grp;
      const int64_t r0 = qb * BQ, M = std::min(BQ, sg.nq - r0);
      const float* Q = Qr.row(bh, sg.q0 + r0);
      std::fill(O.begin(), O.begin() + M * t.Dp, 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t klo = mask.lo(r0), khi = mask.hi(r0 + M - 1);
      for (int64_t kb = klo / BK; kb * BK < khi; ++kb) {
        const int64_t j0 = kb * BK;
        const float* ktb = Kt + (bhk * t.nkb + sg.k0 / BK + kb) * t.Dp * BK;
        const float* vb = Vr.row(bhk, sg.k0 + j0);
        const bool full = mask.full(r0, r0 + M, j0);
        // rows [i0, i0 + rows) against the block's first `keys` keys
        const auto part = [&](int64_t i0, int64_t rows, int64_t keys) {
          float* s = S.data() + i0 * BK;
          kn.abt(rows, keys, t.D, Q + i0 * Qr.sn, Qr.sn, ktb, BK, s, BK);
          if (!full) mask.apply(s, r0 + i0, rows, j0);
          for (int64_t i = i0; i < i0 + rows; ++i) {
            const float alpha = kn.softmax_row(S.data() + i * BK, keys, t.c, &m[i], &l[i]);
            if (alpha != 1.0f) kn.scale_row(O.data() + i * t.Dp, t.Dp, alpha);
          }
          kn.ab(rows, t.Dp, keys, s, BK, 1, vb, Vr.sn, O.data() + i0 * t.Dp, t.Dp);
        };
        if (diagonal_split(mask, r0, M, j0)) {
          part(0, kHalf, kHalf);
          part(kHalf, M - kHalf, BK);
        } else {
          part(0, M, BK);
        }
      }
      fwd_finalize(O.data(), t.Dp, m.data(), l.data(), M, lse + bh * t.NQ + sg.q0 + r0, kn);
      store_rows(kn.vec, O.data(), t.Dp, M, t.D, 1.0f, out.row(b, h, sg.q0 + r0), out.sn);
    }
  });
}

void fwd_bf16(const FwdTask& t, Rows<bf16> Qr, const bf16* Ktp, const bf16* Vp, OutRows<bf16> out, float* lse) {
  const Kernels kn = kernels();
  const int64_t grp = t.Hq / t.Hkv, ntask = t.start.back();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(ntask), 1, [&](int64_t, int64_t) {
    std::vector<float> S(BQ * BK), O(BQ * t.Dp), m(BQ), l(BQ), lv(BQ * 16);
    std::vector<bf16> P(BQ * BK);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      int64_t h, qb;
      const Seg& sg = t.locate(task, &h, &qb);
      const Mask& mask = sg.mask;
      const int64_t b = sg.b, bh = b * t.Hq + h, bhk = b * t.Hkv + h / grp;
      const int64_t r0 = qb * BQ, M = std::min(BQ, sg.nq - r0);
      const bf16* Q = Qr.row(bh, (t.qpacked ? sg.qp0 : sg.q0) + r0);
      std::fill(O.begin(), O.begin() + M * t.Dp, 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(lv.begin(), lv.end(), 0.0f);
      const int64_t klo = mask.lo(r0), khi = mask.hi(r0 + M - 1);
      for (int64_t kb = klo / BK; kb * BK < khi; ++kb) {
        const int64_t j0 = kb * BK;
        const bf16* ktp = Ktp + (bhk * t.nkb + sg.k0 / BK + kb) * t.Dp * BK;
        if (M == BQ && t.c > 0.0f && mask.full(r0, r0 + M, j0)) {
          qk_softmax_fused_bf16(t.Dp / 2, Q, Qr.sn, ktp, t.c, m.data(), lv.data(), O.data(), t.Dp, P.data());
        } else {
          gemm_bf16_avx512(M, BK, t.Dp / 2, Q, Qr.sn, 2, ktp, BK, S.data(), BK, false);
          mask.apply(S.data(), r0, M, j0);
          softmax_tile_bf16(S.data(), M, t.c, m.data(), lv.data(), O.data(), t.Dp, P.data());
        }
        gemm_bf16_avx512<BK, 2>(M, t.Dp, BK / 2, P.data(), BK, 2, Vp + (bhk * t.NKP + sg.k0 + j0) * t.Dp, t.Dp,
                                O.data(), t.Dp, true);
      }
      reduce_rows16_avx512(lv.data(), M, l.data());
      fwd_finalize(O.data(), t.Dp, m.data(), l.data(), M, lse + bh * t.NQ + sg.q0 + r0, kn);
      store_rows(kn.vec, O.data(), t.Dp, M, t.D, 1.0f, out.row(b, h, sg.q0 + r0), out.sn);
    }
  });
}

// ================================================================ forward, few queries (decoding)
// Nq <= kDecodeMaxNq: the tiled path re-lays out all of K/V per call, which a handful of query rows cannot
// amortize (fp32 Nq=1 Nk=4096 B4 H8 D64: 18.7 ms vs SDPA 2.4 ms). Here K and V are read in place (any row
// stride, contiguous head dim, any float dtype) exactly once per (batch, kv head): the R = (Hq/Hkv) * Nq query
// rows of a GQA group share each key. Split-K: each (batch, kv head) is cut into key chunks (a function of the
// shape only), each task keeps an unnormalized (O, m, l) per row, and the chunks are merged afterwards in a fixed
// order with a log-sum-exp rescale (deterministic). Scores: per key, D/16 FMAs per row and one horizontal sum.
constexpr int64_t kDecodeMaxNq = 16;
constexpr int64_t kDecodeSub = 256;  // keys per softmax sub-block inside a chunk

struct DecodeTask {
  int64_t B, Hq, Hkv, Nq, Nk, D, R, nchunk, chunk;
  int64_t ks[3], vs[3];  // k / v strides (batch, head, row); the head dim is contiguous
  Mask mask;
  float c;
};

// One key chunk [c0, c1) of kv head (b, hk) for the R query rows Qr (R x D fp32, contiguous; row r = query head
// hk*grp + r / Nq, query r % Nq). Writes the chunk's unnormalized Oc (R x D), running max mc (log2 units) and
// sum lc.
// r[j] = sum of the 16 lanes of a[j] (j < 16): a 4-level shuffle/add tree (45 ops) and one permute.
FMK_AVX512 static inline __m512 sum16x16_tree(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xFF00, a[2 * i], a[2 * i + 1]),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 3, 2)));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The tree leaves key j in some lane; this finds which, once (feeding a[j] = j in every lane).
struct Sum16Perm {
  alignas(64) int32_t idx[16];
  FMK_AVX512 Sum16Perm() {
    __m512 a[16];
    for (int j = 0; j < 16; ++j) a[j] = _mm512_set1_ps(static_cast<float>(j));
    alignas(64) float out[16];
    _mm512_store_ps(out, sum16x16_tree(a));
    for (int lane = 0; lane < 16; ++lane) idx[static_cast<int>(out[lane]) / 16] = lane;
  }
};

FMK_AVX512 static inline __m512 sum16x16(const __m512* a) {
  static const Sum16Perm perm;
  return _mm512_permutexvar_ps(_mm512_load_si512(perm.idx), sum16x16_tree(a));
}

template <typename T>
FMK_AVX512 void decode_chunk_avx512(const DecodeTask& t, const float* Qr, const T* K, const T* V, int64_t c0,
                                    int64_t c1, float* S, float* Oc, float* mc, float* lc) {
  const int64_t R = t.R, D = t.D, nd = (D + 15) / 16;
  std::fill(Oc, Oc + R * D, 0.0f);
  std::fill(mc, mc + R, kNegInf);
  std::fill(lc, lc + R, 0.0f);
  for (int64_t s0 = c0; s0 < c1; s0 += kDecodeSub) {
    const int64_t n = std::min(kDecodeSub, c1 - s0);
    // scores (log2 units), 16 keys at a time: 16 partial-sum vectors per row, one transposing reduction
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, n - j0);
      for (int64_t r = 0; r < R; ++r) {
        const float* q = Qr + r * D;
        __m512 acc[16];
#pragma GCC unroll 16
        for (int jj = 0; jj < 16; ++jj) {
          acc[jj] = _mm512_setzero_ps();
          if (jj < nj) {  // one key row, in address order
            const T* kr = K + (s0 + j0 + jj) * t.ks[2];
            if (r == 0)  // the row 32 keys ahead (the stream prefetchers lose the 16-row interleave)
              for (int64_t d = 0; d < D * int64_t(sizeof(T)); d += 64)
                _mm_prefetch(reinterpret_cast<const char*>(kr + 32 * t.ks[2]) + d, _MM_HINT_T0);
            for (int64_t d = 0; d < nd; ++d) {
              const __mmask16 km = tail_mask(D - 16 * d);
              acc[jj] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, q + 16 * d), load16(kr + 16 * d, km), acc[jj]);
            }
          }
        }
        _mm512_mask_storeu_ps(S + r * kDecodeSub + j0, tail_mask(nj), _mm512_mul_ps(sum16x16(acc), _mm512_set1_ps(t.c)));
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = r % t.Nq;
      const int64_t a = std::clamp<int64_t>(t.mask.lo(i) - s0, 0, n), b = std::clamp<int64_t>(t.mask.hi(i) - s0, 0, n);
      float* srow = S + r * kDecodeSub;
      if (b <= a) {
        std::fill(srow, srow + n, kNegInf);
        continue;
      }
      std::fill(srow, srow + a, kNegInf);
      std::fill(srow + b, srow + n, kNegInf);
    }
    // online softmax over the sub-block: p = 2^(s - m), O = O * 2^(m_old - m) + P V
    for (int64_t r = 0; r < R; ++r) {
      float* srow = S + r * kDecodeSub;
      __m512 mx = _mm512_set1_ps(kNegInf);
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(srow + j));
      if (j < n) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), tail_mask(n - j), srow + j));
      const float m_new = std::max(mc[r], _mm512_reduce_max_ps(mx));
      if (m_new == kNegInf) {
        std::fill(srow, srow + n, 0.0f);
        continue;
      }
      const float alpha = std::exp2(mc[r] - m_new);  // 0 when mc == -inf
      mc[r] = m_new;
      const __m512 vm = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (j = 0; j < n; j += 16) {
        const __mmask16 k = tail_mask(n - j);
        const __m512 p = _mm512_maskz_mov_ps(k, exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, srow + j), vm)));
        _mm512_mask_storeu_ps(srow + j, k, p);
        sum = _mm512_add_ps(sum, p);
      }
      lc[r] = lc[r] * alpha + _mm512_reduce_add_ps(sum);
      if (alpha != 1.0f) {
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 k = tail_mask(D - d);
          _mm512_mask_storeu_ps(Oc + r * D + d, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, Oc + r * D + d), va));
        }
      }
    }
    // Oc (R x D) += P (R x n) V (n x D): D in 64-wide slices, 4 rows at a time, V slice rows read once per group
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t nv = std::min<int64_t>(4, (D - d0 + 15) / 16);
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const int64_t rr = std::min<int64_t>(4, R - r0);
        __m512 acc[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v)
            acc[r][v] = (r < rr && v < nv) ? _mm512_maskz_loadu_ps(tail_mask(D - d0 - 16 * v), Oc + (r0 + r) * D + d0 + 16 * v)
                                           : _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          const T* vr = V + (s0 + j) * t.vs[2] + d0;
          if (r0 == 0 && d0 == 0 && j + 16 < n)
            for (int64_t d = 0; d < D * int64_t(sizeof(T)); d += 64)
              _mm_prefetch(reinterpret_cast<const char*>(vr + 16 * t.vs[2]) + d, _MM_HINT_T0);
          __m512 vv[4];
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v) vv[v] = v < nv ? load16(vr + 16 * v, tail_mask(D - d0 - 16 * v)) : _mm512_setzero_ps();
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            if (r < rr) {
              const __m512 pj = _mm512_set1_ps(S[(r0 + r) * kDecodeSub + j]);
#pragma GCC unroll 4
              for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(pj, vv[v], acc[r][v]);
            }
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v)
            if (r < rr && v < nv)
              _mm512_mask_storeu_ps(Oc + (r0 + r) * D + d0 + 16 * v, tail_mask(D - d0 - 16 * v), acc[r][v]);
      }
    }
  }
}

template <typename T>
void fwd_decode(const DecodeTask& t, const float* Qf, const T* K, const T* V, T* out, float* lse) {
  const int64_t R = t.R, D = t.D, grp = t.Hq / t.Hkv, ntask = t.B * t.Hkv * t.nchunk;
  // per task: unnormalized O (R x D), m (R), l (R)
  std::vector<float> part(ntask * R * (D + 2));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(ntask), 1, [&](int64_t, int64_t) {
    std::vector<float> S(R * kDecodeSub);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      const int64_t bhk = task / t.nchunk, ch = task % t.nchunk, b = bhk / t.Hkv, hk = bhk % t.Hkv;
      const int64_t c0 = ch * t.chunk, c1 = std::min(t.Nk, c0 + t.chunk);
      float* Oc = part.data() + task * R * (D + 2);
      decode_chunk_avx512<T>(t, Qf + (b * t.Hq + hk * grp) * t.Nq * D, K + b * t.ks[0] + hk * t.ks[1],
                             V + b * t.vs[0] + hk * t.vs[1], c0, c1, S.data(), Oc, Oc + R * D, Oc + R * D + R);
    }
  });
  // merge the chunks of each (batch, kv head) in chunk order: rows r of the group are query head
  // hk*grp + r / Nq, query r % Nq, i.e. out rows (b, hk*grp) * Nq + r (contiguous within the group).
  at::parallel_for(0, t.B * t.Hkv, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> o(D);
    for (int64_t bhk = g0; bhk < g1; ++bhk) {
      for (int64_t r = 0; r < R; ++r) {
        float M = kNegInf;
        for (int64_t ch = 0; ch < t.nchunk; ++ch)
          M = std::max(M, part[(bhk * t.nchunk + ch) * R * (D + 2) + R * D + r]);
        const int64_t row = bhk * R + r;  // (b * Hq + hk * grp) * Nq + r
        T* dst = out + row * D;
        if (M == kNegInf) {
          std::fill(dst, dst + D, T(0.0f));
          lse[row] = kNegInf;
          continue;
        }
        std::fill(o.begin(), o.end(), 0.0f);
        float l = 0.0f;
        for (int64_t ch = 0; ch < t.nchunk; ++ch) {
          const float* P = part.data() + (bhk * t.nchunk + ch) * R * (D + 2);
          const float mc = P[R * D + r];
          if (mc == kNegInf) continue;
          const float w = std::exp2(mc - M);
          l += P[R * D + R + r] * w;
          for (int64_t d = 0; d < D; ++d) o[d] += P[r * D + d] * w;
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
        lse[row] = (M + std::log2(l)) * kLn2;
      }
    }
  });
}

// B4 H8 Nk=4096 D64 (ms, decoding path at Nq=16 vs the tiled path at Nq=17, same run): fp32 1 core 12.8 vs 34.1;
// bf16 2 threads 10.0 vs 20.5 (SDPA 10.3 / 14.5).
bool use_decode_path(const at::Tensor& q) { return use_avx512() && q.size(2) <= kDecodeMaxNq; }

void flash_attention_fwd_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                int64_t window_left, int64_t window_right, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  const at::Tensor Qf = q.to(at::kFloat).contiguous();  // (B, Hq, Nq, D): small
  DecodeTask t;
  t.B = B, t.Hq = Hq, t.Hkv = Hkv, t.Nq = Nq, t.Nk = Nk, t.D = D, t.R = (Hq / Hkv) * Nq;
  for (int i = 0; i < 3; ++i) t.ks[i] = kc.stride(i), t.vs[i] = vc.stride(i);
  // Enough tasks for the threads (>= 32 in all) but chunks of >= 256 keys; depends on the shape only.
  t.nchunk = std::clamp<int64_t>((32 + B * Hkv - 1) / (B * Hkv), 1, std::max<int64_t>(1, Nk / kDecodeSub));
  t.chunk = round_up((Nk + t.nchunk - 1) / t.nchunk, 16);
  t.nchunk = (Nk + t.chunk - 1) / t.chunk;
  t.mask = Mask::of(Nq, Nk, window_left, window_right);
  t.c = static_cast<float>(scale) * kLog2e;
  FMK_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_fwd_decode", [&] {
    fwd_decode<scalar_t>(t, Qf.const_data_ptr<float>(), kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
}

// The tiled forward over segments. qv (B, Hq, NQ, D) and kv, vv (B, Hkv, NK, D): views, any strides; outv
// (B, Hq, NQ, D) writable with a unit d stride; lse (B, Hq, NQ) contiguous fp32. dense: each segment's keys
// are its batch entry's rows [0, NK) (padded in one piece), else they are repacked per segment at k0.
void fwd_segments(const at::Tensor& qv, const at::Tensor& kv, const at::Tensor& vv, std::vector<Seg> segs,
                  int64_t NQP, int64_t NKP, bool dense, double scale, at::Tensor& outv, at::Tensor& lse) {
  FwdTask t;
  t.B = qv.size(0), t.Hq = qv.size(1), t.Hkv = kv.size(1), t.NQ = qv.size(2), t.D = qv.size(3);
  t.Dp = round_up(t.D, 16), t.NKP = NKP, t.nkb = NKP / BK;
  t.segs = std::move(segs);
  t.c = static_cast<float>(scale) * kLog2e;
  t.plan();
  if (t.start.back() == 0) return;
  const auto keys = [&](const at::Tensor& x, at::ScalarType dt) {
    return dense ? padded(x, NKP, t.Dp, dt) : pack_segments(x, t.segs, true, NKP, t.Dp, dt);
  };
  float* lp = lse.data_ptr<float>();
  if (use_bf16_path(qv)) {
    // Q read in place when it already is bf16 rows of Dp elements (any row / head strides)
    const bool q_in_place = qv.scalar_type() == at::kBFloat16 && t.D == t.Dp && qv.stride(3) == 1;
    t.qpacked = !q_in_place && !dense;
    const at::Tensor Qb = q_in_place ? qv
                          : dense    ? padded(qv, t.NQ, t.Dp, at::kBFloat16)
                                     : pack_segments(qv, t.segs, false, NQP, t.Dp, at::kBFloat16);
    const at::Tensor Ktp = pairs_over_d(keys(kv, at::kBFloat16));
    const at::Tensor Vp = pairs_over_rows(keys(vv, at::kBFloat16));
    fwd_bf16(t, rows_of<bf16>(Qb), Ktp.const_data_ptr<bf16>(), Vp.const_data_ptr<bf16>(),
             out_rows<bf16>(outv), lp);
    return;
  }
  at::Tensor qk, kk, vk;
  const Rows<float> Qr = rows_f32(qv, t.NQ, t.Dp, qk);
  Rows<float> Vr;
  if (dense || keys_in_place(t.segs, kv.size(2), NKP)) {
    Vr = rows_f32(vv, NKP, t.Dp, vk);
    rows_f32(kv, NKP, t.Dp, kk);
  } else {
    vk = keys(vv, at::kFloat);
    kk = keys(kv, at::kFloat);
    Vr = rows_of<float>(vk);
  }
  const at::Tensor Kt = block_transpose(kk);
  FMK_DISPATCH_FLOAT_TYPES(qv.scalar_type(), "flash_attention_fwd_cpu", [&] {
    fwd_fp32<scalar_t>(t, Qr, Kt.const_data_ptr<float>(), Vr, out_rows<scalar_t>(outv), lp);
  });
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, int64_t window_left,
                                                          int64_t window_right) {
  const char* op = "fmkernels::flash_attention_fwd";
  check_qkv(q, k, v, op);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};
  if (Nk == 0) {
    out.zero_();
    lse.fill_(kNegInf);
    return {out, lse};
  }
  if (use_decode_path(q)) {
    flash_attention_fwd_decode(q, k, v, scale, window_left, window_right, out, lse);
    return {out, lse};
  }
  fwd_segments(q, k, v, dense_segments(B, Nq, Nk, window_left, window_right), Nq, round_up(Nk, BK), true, scale,
               out, lse);
  return {out, lse};
}

// ================================================================ varlen and key ranges

// q (Tq, Hq, D), k/v (Tk, Hkv, D) -> (1, H, T, D) views after the dense checks.
void check_varlen_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}})
    TORCH_CHECK(t->dim() == 3, op, ": ", name, " must be 3-D (total, H, D), got shape ", t->sizes());
  check_qkv(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), op);
}
at::Tensor as_bhnd(const at::Tensor& x) { return x.transpose(0, 1).unsqueeze(0); }

void check_max_seqlen(const std::vector<Seg>& segs, int64_t max_q, int64_t max_k, const char* op) {
  for (const Seg& s : segs)
    TORCH_CHECK(s.nq <= max_q && s.nk <= max_k, op, ": max_seqlen_q / max_seqlen_k (", max_q, ", ", max_k,
                ") are smaller than a sequence (", s.nq, " queries, ", s.nk, " keys)");
}

std::tuple<at::Tensor, at::Tensor> flash_attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right) {
  const char* op = "fmkernels::flash_attention_varlen_fwd";
  check_varlen_qkv(q, k, v, op);
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2);
  int64_t NQP, NKP;
  std::vector<Seg> segs = varlen_segments(cu_seqlens_q, cu_seqlens_k, Tq, k.size(0), window_left, window_right,
                                          &NQP, &NKP, op);
  check_max_seqlen(segs, max_seqlen_q, max_seqlen_k, op);
  at::Tensor out = at::empty({Tq, Hq, D}, q.options());
  at::Tensor lse = at::empty({Hq, Tq}, q.options().dtype(at::kFloat));
  if (Tq == 0 || Hq == 0) return {out, lse};
  at::Tensor outv = as_bhnd(out), lsev = lse.unsqueeze(0);
  fwd_segments(as_bhnd(q), as_bhnd(k), as_bhnd(v), std::move(segs), NQP, NKP, false, scale, outv, lsev);
  return {out, lse};
}

// key_start / key_end (B,) int32: batch entry b attends to keys [key_start[b], key_end[b]) only (a padded batch;
// masks keep their positions in the padded sequence).
std::vector<Seg> range_segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& key_start,
                                const at::Tensor& key_end, int64_t left, int64_t right, const char* op,
                                at::Tensor& ks, at::Tensor& ke) {
  const int64_t B = q.size(0), Nk = k.size(2);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"key_start", &key_start}, {"key_end", &key_end}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->device().is_cpu() && t->dim() == 1 && t->size(0) == B, op, ": ",
                name, " must be a CPU int32 tensor of shape (", B, ",), got ", t->scalar_type(), " ", t->sizes());
  }
  ks = key_start.contiguous();
  ke = key_end.contiguous();
  const int32_t* s = ks.const_data_ptr<int32_t>();
  const int32_t* e = ke.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= s[b] && s[b] <= e[b] && e[b] <= Nk, op, ": need 0 <= key_start <= key_end <= ", Nk,
                " (the keys), got ", s[b], " and ", e[b], " at batch entry ", b);
  return dense_segments(B, q.size(2), Nk, left, right, s, e);
}

std::tuple<at::Tensor, at::Tensor> flash_attention_range_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& key_start,
                                                                const at::Tensor& key_end, double scale,
                                                                int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_range_fwd";
  check_qkv(q, k, v, op);
  at::Tensor ks, ke;
  std::vector<Seg> segs = range_segments(q, k, key_start, key_end, window_left, window_right, op, ks, ke);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};
  fwd_segments(q, k, v, std::move(segs), Nq, std::max<int64_t>(round_up(Nk, BK), BK), true, scale, out, lse);
  return {out, lse};
}

// ================================================================ backward

struct BwdTask {
  int64_t B, Hq, Hkv, NQ, NQP, NKP, nkb, D, Dp, G;  // NQ: q-side rows per head; NQP: padded (bf16) q rows
  int64_t max_nkb, max_qrows;  // over segments: key blocks; query rows rounded up to BQ
  std::vector<Seg> segs;
  float c;
  void plan() {
    order_by_cost(segs);
    max_nkb = 0, max_qrows = 0;
    int64_t busy = 0;
    for (const Seg& s : segs) {
      max_nkb = std::max(max_nkb, s.nkb());
      max_qrows = std::max(max_qrows, round_up(s.nq, BQ));
      busy += s.nq > 0 && s.nk > 0;
    }
    // Chunks of key blocks per (segment, kv head): enough tasks for the threads; a function of the shape only.
    G = std::clamp<int64_t>((16 + std::max<int64_t>(busy, 1) * Hkv - 1) / (std::max<int64_t>(busy, 1) * Hkv), 1,
                            std::max<int64_t>(max_nkb, 1));
  }
};

// The task loop both backward paths share. Tasks (segment, kv head, chunk g) come from a shared counter; chunk g
// owns key blocks g, g + G, g + 2G, ... (interleaved so causal chunks cost about the same). Per task, dK and dV
// accumulate in fp32 over the GQA group's query heads and are stored once; dQ accumulates per chunk in dq_acc
// (nq_rows rows per head, the segment's at row q_first(seg), summed afterwards) or, when G == 1, in a per-head
// buffer stored right after the head. block(scratch, seg, bh, bhk, kb, dka, dva, dQ) adds key block kb's
// contributions for query head bh, dQ pointing at the segment's first query row; scratch comes from
// make_scratch() once per worker.
template <typename T, typename MakeScratch, typename Block>
void bwd_tasks(const BwdTask& t, int64_t nq_rows, bool padded_q, float* dq_acc, OutRows<T> dq, OutRows<T> dk,
               OutRows<T> dv, float scale, const MakeScratch& make_scratch, const Block& block) {
  const int64_t grp = t.Hq / t.Hkv, per_seg = t.Hkv * t.G, ntask = int64_t(t.segs.size()) * per_seg;
  const bool vec = use_avx512();
  const int64_t per_chunk = (t.max_nkb + t.G - 1) / t.G;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(ntask), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    std::vector<float> dKa(per_chunk * BK * t.Dp), dVa(per_chunk * BK * t.Dp);
    std::vector<float> dq_local(t.G == 1 ? t.max_qrows * t.Dp : 0);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      const Seg& sg = t.segs[task / per_seg];
      const int64_t g = task % t.G, hk = (task % per_seg) / t.G, b = sg.b, bhk = b * t.Hkv + hk;
      const int64_t nkb = sg.nkb(), nown = nkb > g ? (nkb - g + t.G - 1) / t.G : 0;
      if (t.G > 1 && nown == 0) continue;  // (with G == 1 the task still writes its dQ rows, zeros)
      std::fill(dKa.begin(), dKa.begin() + nown * BK * t.Dp, 0.0f);
      std::fill(dVa.begin(), dVa.begin() + nown * BK * t.Dp, 0.0f);
      for (int64_t h = hk * grp; h < (hk + 1) * grp; ++h) {
        const int64_t bh = b * t.Hq + h;
        float* dQ = dq_acc + ((g * t.B * t.Hq + bh) * nq_rows + (padded_q ? sg.qp0 : sg.q0)) * t.Dp;
        if (t.G == 1) {
          dQ = dq_local.data();
          std::fill(dq_local.begin(), dq_local.begin() + round_up(sg.nq, BQ) * t.Dp, 0.0f);
        }
        for (int64_t kb = g, idx = 0; kb < nkb; kb += t.G, ++idx)
          block(scratch, sg, bh, bhk, kb, dKa.data() + idx * BK * t.Dp, dVa.data() + idx * BK * t.Dp, dQ);
        if (t.G == 1) store_rows(vec, dQ, t.Dp, sg.nq, t.D, scale, dq.row(b, h, sg.q0), dq.sn);
      }
      for (int64_t kb = g, idx = 0; kb < nkb; kb += t.G, ++idx) {
        const int64_t j0 = kb * BK, n = std::min(BK, sg.nk - j0);
        store_rows(vec, dKa.data() + idx * BK * t.Dp, t.Dp, n, t.D, scale, dk.row(b, hk, sg.ko + j0), dk.sn);
        store_rows(vec, dVa.data() + idx * BK * t.Dp, t.Dp, n, t.D, 1.0f, dv.row(b, hk, sg.ko + j0), dv.sn);
      }
    }
  });
}

template <typename T>
void bwd_fp32(const BwdTask& t, Rows<float> Qr, Rows<float> dOr, const float* Kt, const float* Vt, Rows<float> Kr,
              const float* lse2, const float* delta, float* dq_acc, OutRows<T> dq, OutRows<T> dk, OutRows<T> dv,
              float scale) {
  const Kernels kn = kernels();
  struct Scratch {
    std::vector<float> S, dP;
  };
  const auto make_scratch = [] { return Scratch{std::vector<float>(BQ * BK), std::vector<float>(BQ * BK)}; };
  bwd_tasks(t, t.NQ, false, dq_acc, dq, dk, dv, scale, make_scratch,
            [&](Scratch& sc, const Seg& sg, int64_t bh, int64_t bhk, int64_t kb, float* dka, float* dva, float* dQ) {
    float* S = sc.S.data();
    float* dP = sc.dP.data();
    const Mask& mask = sg.mask;
    const int64_t j0 = kb * BK;
    const auto [qlo, qhi] = mask.rows_of_keys(j0, std::min(j0 + BK, sg.nk));
    const float* ktb = Kt + (bhk * t.nkb + sg.k0 / BK + kb) * t.Dp * BK;
    const float* vtb = Vt + (bhk * t.nkb + sg.k0 / BK + kb) * t.Dp * BK;
    const float* kfb = Kr.row(bhk, sg.k0 + j0);
    const float* lse2s = lse2 + bh * t.NQ + sg.q0;
    const float* deltas = delta + bh * t.NQ + sg.q0;
    for (int64_t r0 = qlo; r0 < qhi; r0 += BQ) {
      const int64_t M = std::min(BQ, qhi - r0);
      const float* Q = Qr.row(bh, sg.q0 + r0);
      const float* dO = dOr.row(bh, sg.q0 + r0);
      // Rows below `top` see all BK keys; rows above it only the first `top_keys` (kHalf on a split diagonal
      // block, where the P / dS entries past them are never computed and never read).
      const bool split = diagonal_split(mask, r0, M, j0);
      const int64_t top = split ? kHalf : 0, top_keys = split ? kHalf : BK;
      if (top > 0) {
        kn.abt(top, top_keys, t.D, Q, Qr.sn, ktb, BK, S, BK);
        kn.abt(top, top_keys, t.D, dO, dOr.sn, vtb, BK, dP, BK);
      }
      kn.abt(M - top, BK, t.D, Q + top * Qr.sn, Qr.sn, ktb, BK, S + top * BK, BK);
      kn.abt(M - top, BK, t.D, dO + top * dOr.sn, dOr.sn, vtb, BK, dP + top * BK, BK);
      if (!mask.full(r0, r0 + M, j0)) mask.apply(S, r0, M, j0);
      for (int64_t i = 0; i < M; ++i)
        kn.bwd_row(S + i * BK, dP + i * BK, i < top ? top_keys : BK, t.c, lse2s[r0 + i], deltas[r0 + i]);
      if (split) {  // keys [0, kHalf) get every row; keys [kHalf, BK) only the rows below `top`
        kn.ab(kHalf, t.Dp, M, S, 1, BK, dO, dOr.sn, dva, t.Dp);
        kn.ab(BK - kHalf, t.Dp, M - top, S + top * BK + kHalf, 1, BK, dO + top * dOr.sn, dOr.sn,
              dva + kHalf * t.Dp, t.Dp);
        kn.ab(kHalf, t.Dp, M, dP, 1, BK, Q, Qr.sn, dka, t.Dp);
        kn.ab(BK - kHalf, t.Dp, M - top, dP + top * BK + kHalf, 1, BK, Q + top * Qr.sn, Qr.sn,
              dka + kHalf * t.Dp, t.Dp);
        kn.ab(top, t.Dp, top_keys, dP, BK, 1, kfb, Kr.sn, dQ + r0 * t.Dp, t.Dp);
        kn.ab(M - top, t.Dp, BK, dP + top * BK, BK, 1, kfb, Kr.sn, dQ + (r0 + top) * t.Dp, t.Dp);
      } else {
        kn.ab(BK, t.Dp, M, S, 1, BK, dO, dOr.sn, dva, t.Dp);                  // dV += P^T dO
        kn.ab(BK, t.Dp, M, dP, 1, BK, Q, Qr.sn, dka, t.Dp);                   // dK += dS^T Q
        kn.ab(M, t.Dp, BK, dP, BK, 1, kfb, Kr.sn, dQ + r0 * t.Dp, t.Dp);      // dQ += dS K
      }
    }
  });
}

// bf16 path: tiles are computed transposed (S^T = K Q^T, dP^T = V dO^T) so that P^T and dS^T come out
// row-major for dV += P^T dO and dK += dS^T Q; dS K reads dS^T re-paired over keys (Z). Query blocks are
// aligned to BQ (the Q^T / dO^T pair panels are blocked; each segment starts a block); padded query columns
// have lse2 = +inf (P = 0).
void bwd_bf16(const BwdTask& t, const bf16* Kb, const bf16* Vb, const bf16* Qt, const bf16* dOt, const bf16* Qr,
              const bf16* dOr, const bf16* Kr, const float* lse2, const float* delta, float* dq_acc, OutRows<bf16> dq,
              OutRows<bf16> dk, OutRows<bf16> dv, float scale) {
  struct Scratch {
    std::vector<float> ST, dPT;
    std::vector<bf16> PT, dST, Z;  // PT / dST: one BK x BQ block per query block of the key block
  };
  const int64_t nqb = std::max<int64_t>(t.max_qrows / BQ, 1);
  const auto make_scratch = [&] {
    return Scratch{std::vector<float>(BK * BQ), std::vector<float>(BK * BQ), std::vector<bf16>(nqb * BK * BQ),
                   std::vector<bf16>(nqb * BK * BQ), std::vector<bf16>(BK * BQ)};
  };
  bwd_tasks(t, t.NQP, true, dq_acc, dq, dk, dv, scale, make_scratch,
            [&](Scratch& sc, const Seg& sg, int64_t bh, int64_t bhk, int64_t kb, float* dka, float* dva, float* dQ) {
    const Mask& mask = sg.mask;
    const int64_t j0 = kb * BK;
    const auto [qa, qhi] = mask.rows_of_keys(j0, std::min(j0 + BK, sg.nk));
    if (qa >= qhi) return;
    const int64_t qlo = qa / BQ * BQ;
    const bf16* kb_rows = Kb + (bhk * t.NKP + sg.k0 + j0) * t.Dp;
    const bf16* vb_rows = Vb + (bhk * t.NKP + sg.k0 + j0) * t.Dp;
    const bf16* krb = Kr + (bhk * t.NKP + sg.k0 + j0) * t.Dp;
    const int64_t base = bh * t.NQP + sg.qp0;
    int64_t nblk = 0;
    for (int64_t r0 = qlo; r0 < qhi; r0 += BQ, ++nblk) {
      const int64_t off = base + r0;
      bf16* PT = sc.PT.data() + nblk * BK * BQ;
      bf16* dST = sc.dST.data() + nblk * BK * BQ;
      if (mask.full(r0, std::min(r0 + BQ, sg.nq), j0)) {
        bwd_sdp_fused_bf16(t.Dp / 2, kb_rows, vb_rows, t.Dp, Qt + off * t.Dp, dOt + off * t.Dp, t.c, lse2 + off,
                           delta + off, PT, dST, sc.Z.data());
      } else {
        gemm_bf16_avx512(BK, BQ, t.Dp / 2, vb_rows, t.Dp, 2, dOt + off * t.Dp, BQ, sc.dPT.data(), BQ, false);
        gemm_bf16_avx512(BK, BQ, t.Dp / 2, kb_rows, t.Dp, 2, Qt + off * t.Dp, BQ, sc.ST.data(), BQ, false);
        mask.apply_t(sc.ST.data(), r0, j0);
        bwd_tile_t_bf16(sc.ST.data(), sc.dPT.data(), t.c, lse2 + off, delta + off, PT, dST, sc.Z.data());
      }
      gemm_bf16_avx512<2, 2 * BQ>(BQ, t.Dp, BK / 2, sc.Z.data(), 2, 2 * BQ, krb, t.Dp, dQ + r0 * t.Dp, t.Dp, true);  // dQ
    }
    const int64_t off = base + qlo;
    gemm_bf16_blocked_avx512<BQ, 2>(BK, t.Dp, BQ / 2, nblk, BK * BQ, sc.PT.data(), BQ, 2, dOr + off * t.Dp, t.Dp,
                                    dva, t.Dp, true);  // dV += P^T dO
    gemm_bf16_blocked_avx512<BQ, 2>(BK, t.Dp, BQ / 2, nblk, BK * BQ, sc.dST.data(), BQ, 2, Qr + off * t.Dp, t.Dp,
                                    dka, t.Dp, true);  // dK += dS^T Q
  });
}

// x (B, H, NQ) fp32 -> (B, H, NQP) with each segment's rows at qp0, `fill` elsewhere.
at::Tensor pack_rows3(const at::Tensor& x, const std::vector<Seg>& segs, bool dense, int64_t NQP, float fill) {
  if (dense) return x.size(2) == NQP ? x : at::constant_pad_nd(x, {0, NQP - x.size(2)}, fill);
  at::Tensor out = at::full({x.size(0), x.size(1), NQP}, fill, x.options());
  for (const Seg& s : segs)
    if (s.nq > 0) out.select(0, s.b).narrow(1, s.qp0, s.nq).copy_(x.select(0, s.b).narrow(1, s.q0, s.nq));
  return out;
}

// The tiled backward over segments (views as in fwd_segments); writes dqv (B, Hq, NQ, D), dkv, dvv
// (B, Hkv, NK, D) (unit d stride). NQP: padded query rows for the bf16 path (each segment at qp0).
void bwd_segments(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, std::vector<Seg> segs, int64_t NQP, int64_t NKP,
                  bool dense, double scale, at::Tensor& dqv, at::Tensor& dkv, at::Tensor& dvv) {
  BwdTask t;
  t.B = q.size(0), t.Hq = q.size(1), t.Hkv = k.size(1), t.NQ = q.size(2), t.D = q.size(3);
  t.Dp = round_up(t.D, 16), t.NKP = NKP, t.nkb = NKP / BK;
  t.segs = std::move(segs);
  t.plan();
  t.c = static_cast<float>(scale) * kLog2e;
  const float fscale = static_cast<float>(scale);
  const int64_t B = t.B, Hq = t.Hq, NQ = t.NQ, D = t.D;
  const bool bf16_path = use_bf16_path(q);
  t.NQP = bf16_path ? NQP : NQ;
  // delta = rowsum(dO * O) in fp32; lse2 = lse * log2(e), +inf on rows that see no key (so P = 0 there) and on
  // padded rows.
  at::Tensor delta = at::empty({B, Hq, NQ}, q.options().dtype(at::kFloat));
  {
    // in place when d has a unit stride (any other strides), else one contiguous copy
    const auto unit_d = [&](const at::Tensor& x) {
      return x.scalar_type() == q.scalar_type() && x.stride(3) == 1 ? x : x.to(q.scalar_type()).contiguous();
    };
    const at::Tensor dOc = unit_d(grad_out), Oc = unit_d(out);
    const bool avx512 = use_avx512();
    float* dp = delta.data_ptr<float>();
    FMK_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_delta", [&] {
      const Rows<scalar_t> a = rows_of<scalar_t>(dOc), o = rows_of<scalar_t>(Oc);
      at::parallel_for(0, B * Hq * NQ, 256, [&](int64_t r0, int64_t r1) {
        if (avx512)
          delta_rows_avx512<scalar_t>(a, o, NQ, dp, r0, r1, D);
        else
          delta_rows_portable<scalar_t>(a, o, NQ, dp, r0, r1, D);
      });
    });
  }
  at::Tensor lse2 = lse.to(at::kFloat) * kLog2e;
  lse2 = at::where(at::isinf(lse2), at::full({}, kPosInf, lse2.options()), lse2);
  if (t.NQP != NQ || !dense) {
    if (bf16_path) {
      delta = pack_rows3(delta, t.segs, dense, t.NQP, 0.0f);
      lse2 = pack_rows3(lse2, t.segs, dense, t.NQP, kPosInf);
    }
  }
  delta = delta.contiguous();
  lse2 = lse2.contiguous();
  // dQ partials per key chunk (only when G > 1; with G == 1 each task writes its heads' dQ directly).
  at::Tensor dq_acc = t.G > 1 ? at::zeros({t.G, B, Hq, t.NQP, t.Dp}, q.options().dtype(at::kFloat)) : at::Tensor();
  float* dq_acc_p = t.G > 1 ? dq_acc.data_ptr<float>() : nullptr;
  const auto keys = [&](const at::Tensor& x, at::ScalarType dt) {
    return dense ? padded(x, NKP, t.Dp, dt) : pack_segments(x, t.segs, true, NKP, t.Dp, dt);
  };

  if (bf16_path) {
    const auto queries = [&](const at::Tensor& x) {
      return dense ? padded(x, t.NQP, t.Dp, at::kBFloat16) : pack_segments(x, t.segs, false, t.NQP, t.Dp, at::kBFloat16);
    };
    const at::Tensor Qb = queries(q), dOb = queries(grad_out);
    const at::Tensor Kb = keys(k, at::kBFloat16), Vb = keys(v, at::kBFloat16);
    const at::Tensor Qt = pairs_over_d(Qb), dOt = pairs_over_d(dOb);  // BQ == BK: same blocking
    const at::Tensor Qr = pairs_over_rows(Qb), dOr = pairs_over_rows(dOb), Kr = pairs_over_rows(Kb);
    bwd_bf16(t, Kb.const_data_ptr<bf16>(), Vb.const_data_ptr<bf16>(), Qt.const_data_ptr<bf16>(),
             dOt.const_data_ptr<bf16>(), Qr.const_data_ptr<bf16>(), dOr.const_data_ptr<bf16>(),
             Kr.const_data_ptr<bf16>(), lse2.const_data_ptr<float>(), delta.const_data_ptr<float>(), dq_acc_p,
             out_rows<bf16>(dqv), out_rows<bf16>(dkv), out_rows<bf16>(dvv), fscale);
  } else {
    at::Tensor qk, dok, kk, vk;
    const Rows<float> Qr = rows_f32(q, NQ, t.Dp, qk), dOr = rows_f32(grad_out, NQ, t.Dp, dok);
    Rows<float> Kr;
    if (dense || keys_in_place(t.segs, k.size(2), NKP)) {
      Kr = rows_f32(k, NKP, t.Dp, kk);
      rows_f32(v, NKP, t.Dp, vk);
    } else {
      kk = keys(k, at::kFloat);
      vk = keys(v, at::kFloat);
      Kr = rows_of<float>(kk);
    }
    const at::Tensor Kt = block_transpose(kk), Vt = block_transpose(vk);
    FMK_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_bwd_cpu", [&] {
      bwd_fp32<scalar_t>(t, Qr, dOr, Kt.const_data_ptr<float>(), Vt.const_data_ptr<float>(), Kr,
                         lse2.const_data_ptr<float>(), delta.const_data_ptr<float>(), dq_acc_p,
                         out_rows<scalar_t>(dqv), out_rows<scalar_t>(dkv), out_rows<scalar_t>(dvv), fscale);
    });
  }
  // dQ = scale * sum over chunks (fixed order) of the fp32 partials.
  if (t.G > 1) {
    const at::Tensor sum = dq_acc.sum(0).narrow(3, 0, D).mul_(fscale);  // (B, Hq, NQP, D)
    if (!bf16_path) {
      dqv.copy_(sum);
    } else {
      for (const Seg& s : t.segs)
        if (s.nq > 0) dqv.select(0, s.b).narrow(1, s.q0, s.nq).copy_(sum.select(0, s.b).narrow(1, s.qp0, s.nq));
    }
  }
}

void check_bwd_shapes(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                      const char* op) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              op, ": lse must have shape (B, Hq, Nq), got ", lse.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_bwd";
  check_qkv(q, k, v, op);
  check_bwd_shapes(grad_out, q, out, lse, op);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  at::Tensor dq = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, Nk, D}, k.options());  // every row is written
  at::Tensor dv = at::empty({B, Hkv, Nk, D}, v.options());
  if (B == 0 || Hq == 0 || Nq == 0 || Nk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  bwd_segments(grad_out, q, k, v, out, lse, dense_segments(B, Nq, Nk, window_left, window_right), round_up(Nq, BQ),
               round_up(Nk, BK), true, scale, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_varlen_bwd";
  check_varlen_qkv(q, k, v, op);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), op,
              ": lse must have shape (Hq, total_q), got ", lse.sizes());
  const int64_t Tq = q.size(0), Tk = k.size(0);
  int64_t NQP, NKP;
  std::vector<Seg> segs = varlen_segments(cu_seqlens_q, cu_seqlens_k, Tq, Tk, window_left, window_right, &NQP, &NKP,
                                          op);
  check_max_seqlen(segs, max_seqlen_q, max_seqlen_k, op);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);  // every row is written
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (Tq == 0 || Tk == 0 || q.size(1) == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor dqv = as_bhnd(dq), dkv = as_bhnd(dk), dvv = as_bhnd(dv);
  bwd_segments(as_bhnd(grad_out), as_bhnd(q), as_bhnd(k), as_bhnd(v), as_bhnd(out), lse.unsqueeze(0), std::move(segs),
               NQP, NKP, false, scale, dqv, dkv, dvv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_range_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& key_start, const at::Tensor& key_end, double scale, int64_t window_left,
    int64_t window_right) {
  const char* op = "fmkernels::flash_attention_range_bwd";
  check_qkv(q, k, v, op);
  check_bwd_shapes(grad_out, q, out, lse, op);
  at::Tensor ks, ke;
  std::vector<Seg> segs = range_segments(q, k, key_start, key_end, window_left, window_right, op, ks, ke);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  at::Tensor dq = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, Nk, D}, k.options());
  at::Tensor dv = at::empty({B, Hkv, Nk, D}, v.options());
  if (B == 0 || Hq == 0 || Nq == 0 || Nk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  bwd_segments(grad_out, q, k, v, out, lse, std::move(segs), round_up(Nq, BQ), round_up(Nk, BK), true, scale, dq, dk,
               dv);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) {
  m.impl("flash_attention_fwd", &fmk::cpu::flash_attention_fwd_cpu);
  m.impl("flash_attention_bwd", &fmk::cpu::flash_attention_bwd_cpu);
  m.impl("flash_attention_varlen_fwd", &fmk::cpu::flash_attention_varlen_fwd_cpu);
  m.impl("flash_attention_varlen_bwd", &fmk::cpu::flash_attention_varlen_bwd_cpu);
  m.impl("flash_attention_range_fwd", &fmk::cpu::flash_attention_range_fwd_cpu);
  m.impl("flash_attention_range_bwd", &fmk::cpu::flash_attention_range_bwd_cpu);
}
