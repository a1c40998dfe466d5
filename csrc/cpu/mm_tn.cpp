// out (N, K) (+)= a^T b for fp32 a (T, N) and b (T, K): the weight gradient of a linear layer (a = dY, b = X),
// read as both tensors lie, with no transposed copy.
//
// For each reduction row t, a[t, n0 .. n0+11] are 12 consecutive floats (the broadcast side) and b[t, k0 .. k0+31]
// two zmm (the vector side), so a 12 x 32 register tile of `out` accumulates straight from the row-major inputs:
// 24 accumulators, 2 loads and 12 broadcast FMA pairs per t. Rows t are blocked by KC = 192 and out columns by
// NC = 256 (b's KC x NC block stays in L2; the a panel, 12 x KC, in L1 across the k tiles). Threads split the
// n tiles (or the k tiles when there are fewer n tiles than threads). MKL's sgemm (what torch.mm runs) takes
// its AVX2 path on this AMD CPU. Measured side by side, 2 cores Zen 4 (GFLOP/s, best of 2 rounds; FMA peak 234):
//   (T, N, K) = (2048, 1152, 384) MKL 201  this 221     (2048, 384, 384)  MKL 198  this 227
//               (2048, 2048, 384) MKL 191  this 213     (2048, 384, 1024) MKL 192  this 207
//               (2048, 2048, 2048) MKL 199 this 208     (512, 8192, 384)  MKL 185  this 206
// Runs vary by a few percent: (2048, 2048, 384) also measured 185-197 against MKL's 193-194, (2048, 2048, 2048)
// 186-194 against 193-201. Without the NC blocking K = 2048 lost clearly (181 vs 193); packing the a panel
// (against 4 KiB row-stride aliasing) measured 1-8% slower everywhere (and 160 -> 140 at (256, 32768, 384)).
// K <= 512 runs as one column block (3 runs each, against NC = 256 side by side): (2048, 2048, 384) 187-191 ->
// 207-211, (256, 32768, 384) 158-163 -> 168-173, (512, 32768, 384) 163-168 -> 171-177 (the fused loss's dW at
// vocab 32k), the other shapes above within noise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

constexpr int64_t kMR = 12;  // out rows (n) per register tile
constexpr int64_t kKC = 192;  // reduction rows (t) per block
constexpr int64_t kNC = 256;  // out columns (k) per block: b's KC x NC block (192 KiB) stays in L2
constexpr int64_t kNCWhole = 512;  // up to this many out columns: one block

// out[0..MR) x [0 .. 16*NV) (+)= sum over T rows; the last vector column is masked by `last`.
template <int MR, int NV>
FMK_AVX512 static inline void tn_tile(int64_t T, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                      int64_t ldc, bool accumulate, __mmask16 last) {
  __m512 acc[MR * NV];
#pragma GCC unroll 32
  for (int x = 0; x < MR * NV; ++x) acc[x] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, b + 16 * v) : _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i * NV + v] = _mm512_fmadd_ps(ai, bv[v], acc[i * NV + v]);
    }
    a += lda;
    b += ldb;
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* ci = c + i * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      __m512 r = acc[i * NV + v];
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, ci));
      _mm512_mask_storeu_ps(ci, m, r);
    }
  }
}

// Rows [n0, n0 + MR) of out, all k tiles in [k0, k1).
template <int MR>
FMK_AVX512 static void tn_rows(int64_t T, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                               int64_t ldc, int64_t k0, int64_t k1, bool accumulate) {
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) tn_tile<MR, 2>(T, a, lda, b + k, ldb, c + k, ldc, accumulate, 0xFFFF);
  for (; k < k1; k += 16)
    tn_tile<MR, 1>(T, a, lda, b + k, ldb, c + k, ldc, accumulate, tail_mask(std::min<int64_t>(16, k1 - k)));
}

FMK_AVX512 void tn_block_avx512(int64_t T, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                int64_t ldc, int64_t n0, int64_t n1, int64_t k0, int64_t k1, bool accumulate) {
  // Up to kNCWhole columns run as one block (b's KC x 512 block, 384 KiB, still fits L2): each a panel (12 x KC,
  // the strided broadcast side) is then read once per KC rows, not once per column block.
  const int64_t nc = k1 - k0 <= kNCWhole ? k1 - k0 : kNC;
  for (int64_t kc0 = k0; kc0 < k1; kc0 += nc) {
    const int64_t kc1 = std::min(k1, kc0 + nc);
    for (int64_t t0 = 0; t0 < T; t0 += kKC) {
      const int64_t tc = std::min(kKC, T - t0);
      const bool acc = accumulate || t0 > 0;
      const float* at = a + t0 * lda;
      const float* bt = b + t0 * ldb;
      int64_t n = n0;
      for (; n + kMR <= n1; n += kMR) tn_rows<kMR>(tc, at + n, lda, bt, ldb, c + n * ldc, ldc, kc0, kc1, acc);
      for (; n + 4 <= n1; n += 4) tn_rows<4>(tc, at + n, lda, bt, ldb, c + n * ldc, ldc, kc0, kc1, acc);
      for (; n < n1; ++n) tn_rows<1>(tc, at + n, lda, bt, ldb, c + n * ldc, ldc, kc0, kc1, acc);
    }
  }
}

void check_2d_f32(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "fmkernels::mm_tn_: ", name, " must be a 2-D fp32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fmkernels::mm_tn_: ", name,
              " must have a unit last-dim stride, got strides ", x.strides());
}

void mm_tn_cpu(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  check_2d_f32(out, "out");
  check_2d_f32(a, "a");
  check_2d_f32(b, "b");
  const int64_t T = a.size(0), N = a.size(1), K = b.size(1);
  TORCH_CHECK(b.size(0) == T, "fmkernels::mm_tn_: a and b must have the same number of rows, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(out.size(0) == N && out.size(1) == K, "fmkernels::mm_tn_: out must have shape (", N, ", ", K,
              "), got ", out.sizes());
  if (N == 0 || K == 0) return;
  if (T == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  if (!use_avx512()) {
    out.addmm_(a.t(), b, accumulate ? 1.0 : 0.0, 1.0);
    return;
  }
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* cp = out.data_ptr<float>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = out.stride(0);
  const int64_t nth = at::get_num_threads();
  const int64_t n_tiles = (N + kMR - 1) / kMR, k_tiles = (K + 31) / 32;
  const bool split_n = n_tiles >= nth || k_tiles < n_tiles;
  const int64_t parts = std::max<int64_t>(1, std::min(nth, split_n ? n_tiles : k_tiles));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      if (split_n) {
        const int64_t n0 = std::min(N, n_tiles * p / parts * kMR), n1 = std::min(N, n_tiles * (p + 1) / parts * kMR);
        tn_block_avx512(T, ap, lda, bp, ldb, cp, ldc, n0, n1, 0, K, accumulate);
      } else {
        const int64_t k0 = std::min(K, k_tiles * p / parts * 32), k1 = std::min(K, k_tiles * (p + 1) / parts * 32);
        tn_block_avx512(T, ap, lda, bp, ldb, cp, ldc, 0, N, k0, k1, accumulate);
      }
    }
  });
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) { m.impl("mm_tn_", &fmk::cpu::mm_tn_cpu); }
