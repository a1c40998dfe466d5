// AVX512-BF16 register tiles (vdpbf16ps) on pair-panel operands and the softmax / backward tiles fused with
// them. Internal linkage: each translation unit that includes this compiles its own copy.
#pragma once

#include "cpu/flash_attention/tiles.h"

namespace fmk::cpu::flash_attn {
namespace {

// ================================================================ AVX-512 BF16 kernels
// Pair layouts: a "pair panel" of a (K x N) operand stores, for each k pair, N lanes of (x[2kp][n], x[2kp+1][n]).
// vdpbf16ps(acc, a, b): acc[n] += a[2n] * b[2n] + a[2n+1] * b[2n+1].


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
  // the < 8 rows left, one at a time (a bound the compiler can see: `i < M` alone drew a GCC
  // -Waggressive-loop-optimizations false positive where M = 64 is a constant)
  for (const int64_t end = std::min<int64_t>(M, i + 7); i < end; ++i)
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
  // *m == -inf: m + kRescale is -inf and any finite lane triggers; all lanes -inf: nothing visible yet. A NaN
  // lane (or m) triggers too (unordered: true), so a row of NaN scores goes NaN rather than looking empty.
  if (_mm512_cmp_ps_mask(mx, _mm512_set1_ps(*m + kRescale), _CMP_NLE_UQ) != 0) {
    const float tile_max = _mm512_reduce_max_ps(mx);
    alpha = std::exp2(*m - tile_max);  // 0 when *m == -inf
    *m = tile_max;
  } else if (*m == kNegInf) {
    __mmask16 nan = 0;  // (rare branch) a NaN dropped by vmaxps next to masked scores: the row goes NaN
    for (int v = 0; v < 4; ++v) nan |= _mm512_cmp_ps_mask(t[v], t[v], _CMP_UNORD_Q);
    if (nan == 0) {
      std::fill(p, p + BK, bf16(0.0f));
      return;
    }
    *m = std::numeric_limits<float>::quiet_NaN();
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

}  // namespace
}  // namespace fmk::cpu::flash_attn
