// 2:4 + int8 sparse matmul on CPU: exact int32 y = x @ W^T, x int8 (M, K), W int8 2:4 (values (N, K/2), meta).
//
// Per 64 kept values (128 columns of W, 4 meta words): vpmultishiftqb pulls every value's 2-bit position
// into its own byte, one OR adds the group base, and vpermt2b gathers the 64 activations they multiply
// from the 128 in registers; vpdpbusd then does 64 MACs. VNNI multiplies u8 x s8, so the gathered x is
// offset by 128 (x ^ 0x80) and 128 * rowsum(W) is subtracted at the end (exact in int32).
// Needs AVX-512 VNNI + VBMI (checked at run time); portable scalar fallback otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/vec.h"

#define FMK_AVX512_VNNI_VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,f16c")))

namespace fmk::cpu {
namespace {

bool use_vnni_vbmi() { return use_avx512_vnni() && use_avx512_vbmi(); }

static inline __mmask64 mask64(int64_t n) { return n >= 64 ? ~0ULL : ((1ULL << n) - 1ULL); }

FMK_AVX512_VNNI_VBMI static inline __m512i gather_index(const int32_t* words, int nwords) {
  // byte l (0..63) = 4 * (l / 2) + ((meta >> 2l) & 3), meta = 128 bits from 4 words
  const __m128i m = _mm_maskz_loadu_epi32(static_cast<__mmask8>((1u << nwords) - 1u), words);
  const __m512i src = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1), _mm512_castsi128_si512(m));
  alignas(64) static const uint8_t ctrl_b[64] = {
      0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
      44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22,
      24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  alignas(64) static const uint8_t base_b[64] = {
      0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20, 20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40,
      44, 44, 48, 48, 52, 52, 56, 56, 60, 60, 64, 64, 68, 68, 72, 72, 76, 76, 80, 80, 84, 84,
      88, 88, 92, 92, 96, 96, 100, 100, 104, 104, 108, 108, 112, 112, 116, 116, 120, 120, 124, 124};
  const __m512i s = _mm512_multishift_epi64_epi8(_mm512_load_si512(ctrl_b), src);
  return _mm512_ternarylogic_epi32(s, _mm512_set1_epi8(3), _mm512_load_si512(base_b), 0xEA);
}

template <int MR, int NR>
FMK_AVX512_VNNI_VBMI void i8_tile(const int8_t* x, const int8_t* vals, const int32_t* meta, const int32_t* rowsum,
                                  int32_t* y, int64_t m0, int64_t n0, int64_t K, int64_t N) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_si512();
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    const int64_t kv = std::min<int64_t>(128, K - k0), jv = kv / 2;
    __m512i xlo[MR], xhi[MR];
    for (int i = 0; i < MR; ++i) {
      const int8_t* xr = x + (m0 + i) * K + k0;
      xlo[i] = _mm512_maskz_loadu_epi8(mask64(std::min<int64_t>(64, kv)), xr);
      xhi[i] = _mm512_maskz_loadu_epi8(mask64(std::max<int64_t>(0, kv - 64)), xr + 64);
    }
    const int nwords = static_cast<int>((jv + 15) / 16);
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi8(mask64(jv), vals + (n0 + r) * half + k0 / 2);
      const __m512i idx = gather_index(meta + (n0 + r) * nw + k0 / 32, nwords);
      for (int i = 0; i < MR; ++i) {
        const __m512i xg = _mm512_xor_si512(_mm512_permutex2var_epi8(xlo[i], idx, xhi[i]), flip);
        acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], xg, v);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r)
      y[(m0 + i) * N + n0 + r] = _mm512_reduce_add_epi32(acc[i][r]) - 128 * rowsum[n0 + r];
}

// rowsum[n] = sum_j values[n, j] (int32), for the +128 offset correction. (torch's int8 sum took ~40 ms here.)
FMK_AVX512_VNNI_VBMI void rowsums(const int8_t* vals, int32_t* rowsum, int64_t n0, int64_t n1, int64_t half) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n = n0; n < n1; ++n) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t j = 0; j < half; j += 64)
      acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(mask64(half - j), vals + n * half + j));
    rowsum[n] = _mm512_reduce_add_epi32(acc);
  }
}

template <int NR>
FMK_AVX512_VNNI_VBMI void i8_rows(const int8_t* x, const int8_t* vals, const int32_t* meta, const int32_t* rowsum,
                                  int32_t* y, int64_t M, int64_t n0, int64_t K, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) i8_tile<4, NR>(x, vals, meta, rowsum, y, m, n0, K, N);
  switch (M - m) {
    case 3: i8_tile<3, NR>(x, vals, meta, rowsum, y, m, n0, K, N); break;
    case 2: i8_tile<2, NR>(x, vals, meta, rowsum, y, m, n0, K, N); break;
    case 1: i8_tile<1, NR>(x, vals, meta, rowsum, y, m, n0, K, N); break;
    default: break;
  }
}

void i8_portable(const int8_t* x, const int8_t* vals, const int32_t* meta, int32_t* y, int64_t M, int64_t n0,
                 int64_t n1, int64_t K, int64_t N) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      int32_t s = 0;
      for (int64_t j = 0; j < half; ++j) {
        const uint32_t w = static_cast<uint32_t>(meta[n * nw + (j >> 4)]);
        const int64_t c = 4 * (j >> 1) + ((w >> (2 * (j & 15))) & 3u);
        s += static_cast<int32_t>(vals[n * half + j]) * static_cast<int32_t>(x[m * K + c]);
      }
      y[m * N + n] = s;
    }
}

at::Tensor sparse24_int8_mm_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& meta_in) {
  const char* op = "fmkernels::sparse24_int8_mm";
  TORCH_CHECK(x_in.scalar_type() == at::kChar && values_in.scalar_type() == at::kChar, op,
              ": x and values must be int8, got ", x_in.scalar_type(), " and ", values_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && values_in.dim() == 2 && values_in.size(1) * 2 == x_in.size(1), op,
              ": x (M, K) and values (N, K/2) expected, got ", x_in.sizes(), " and ", values_in.sizes());
  TORCH_CHECK(x_in.size(1) % 4 == 0, op, ": K must be a multiple of 4, got ", x_in.size(1));
  TORCH_CHECK(meta_in.scalar_type() == at::kInt && meta_in.size(0) == values_in.size(0) &&
                  meta_in.size(1) == (x_in.size(1) + 31) / 32,
              op, ": meta must be int32 (N, ceil(K/32)), got ", meta_in.sizes());
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), meta = meta_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  at::Tensor y = at::zeros({M, N}, x.options().dtype(at::kInt));
  if (M == 0 || N == 0 || K == 0) return y;
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* vp = values.data_ptr<int8_t>();
  const int32_t* mp = meta.data_ptr<int32_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  if (!use_vnni_vbmi()) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { i8_portable(xp, vp, mp, yp, M, n0, n1, K, N); });
    return y;
  }
  std::vector<int32_t> rowsum(N);
  int32_t* rs = rowsum.data();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    rowsums(vp, rs, n0, n1, K / 2);
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) i8_rows<4>(xp, vp, mp, rs, yp, M, n, K, N);
    for (; n < n1; ++n) i8_rows<1>(xp, vp, mp, rs, yp, M, n, K, N);
  });
  return y;
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) { m.impl("sparse24_int8_mm", &fmk::cpu::sparse24_int8_mm_cpu); }
