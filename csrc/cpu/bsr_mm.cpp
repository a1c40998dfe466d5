// Block-sparse (BSR) matmul on CPU: y = x @ W^T (+ bias), W (N, K) as square b x b blocks (b = 16/32/64),
// grouped by block row (row_ptr, col_idx); layout in fmkernels/reference/sparse.py.
//
// Only kept blocks are visited: each is a small dense GEMM. x is packed once into x^T panels of 48 rows
// ((K, 48) fp32); a block row r of y for one panel is a (b, 48) fp32 tile in L1 that every kept block of
// row r accumulates into. Micro-kernel: 8 rows of the block x 48 panel rows = 24 zmm accumulators; per k one
// broadcast of W[n, k] per block row and 3 panel loads (24 FMAs per 11 loads). Panels outermost (the packed
// panel, K x 48 x 4 bytes, stays in L2), block rows split across threads. Portable scalar fallback.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

constexpr int kPanel = 48;

template <int MJ>
FMK_AVX512 void block_tile(const float* blk, const float* xs, float* tile, int b) {
  // tile[n][kPanel] += sum_k blk[n][k] * xs[k][kPanel], n in [0, b), 8 rows at a time
  for (int n0 = 0; n0 < b; n0 += 8) {
    __m512 acc[8][MJ];
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < MJ; ++j) acc[i][j] = _mm512_loadu_ps(tile + (n0 + i) * kPanel + 16 * j);
    const float* bp = blk + n0 * b;
    for (int k = 0; k < b; ++k) {
      __m512 xv[MJ];
      for (int j = 0; j < MJ; ++j) xv[j] = _mm512_loadu_ps(xs + k * kPanel + 16 * j);
      for (int i = 0; i < 8; ++i) {
        const __m512 w = _mm512_set1_ps(bp[i * b + k]);
        for (int j = 0; j < MJ; ++j) acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < MJ; ++j) _mm512_storeu_ps(tile + (n0 + i) * kPanel + 16 * j, acc[i][j]);
  }
}

void block_tile_portable(const float* blk, const float* xs, float* tile, int b, int rows) {
  for (int n = 0; n < b; ++n)
    for (int k = 0; k < b; ++k) {
      const float w = blk[n * b + k];
      for (int i = 0; i < rows; ++i) tile[n * kPanel + i] += w * xs[k * kPanel + i];
    }
}

template <typename T>
void pack_panel(const T* x, float* xt, int64_t m0, int64_t rows, int64_t K) {
  // xt[k * kPanel + i] = x[m0 + i, k]; k blocked so the destination block stays in L1
  std::fill(xt, xt + K * kPanel, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += 64) {
    const int64_t k1 = std::min<int64_t>(K, k0 + 64);
    for (int64_t i = 0; i < rows; ++i) {
      const T* xr = x + (m0 + i) * K;
      for (int64_t k = k0; k < k1; ++k) xt[k * kPanel + i] = static_cast<float>(xr[k]);
    }
  }
}

template <typename T>
void bsr_rows(const float* xt, const T* blocks, const int32_t* row_ptr, const int32_t* col_idx, float* y,
              int64_t r0, int64_t r1, int b, int64_t m0, int64_t rows, int64_t N, bool avx512) {
  std::vector<float> tile(static_cast<size_t>(b) * kPanel);
  std::vector<float> conv(std::is_same_v<T, float> ? 0 : static_cast<size_t>(b) * b);
  const int mj = static_cast<int>((rows + 15) / 16);
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(tile.begin(), tile.end(), 0.0f);
    for (int64_t i = row_ptr[r]; i < row_ptr[r + 1]; ++i) {
      const T* src = blocks + i * b * b;
      const float* blk;
      if constexpr (std::is_same_v<T, float>) {
        blk = src;
      } else {
        for (int64_t e = 0; e < static_cast<int64_t>(b) * b; ++e) conv[e] = static_cast<float>(src[e]);
        blk = conv.data();
      }
      const float* xs = xt + static_cast<int64_t>(col_idx[i]) * b * kPanel;
      if (!avx512) {
        block_tile_portable(blk, xs, tile.data(), b, static_cast<int>(rows));
      } else if (mj == 3) {
        block_tile<3>(blk, xs, tile.data(), b);
      } else if (mj == 2) {
        block_tile<2>(blk, xs, tile.data(), b);
      } else {
        block_tile<1>(blk, xs, tile.data(), b);
      }
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int n = 0; n < b; ++n) y[(m0 + i) * N + r * b + n] = tile[n * kPanel + i];
  }
}

at::Tensor bsr_mm_cpu(const at::Tensor& x_in, const at::Tensor& blocks_in, const at::Tensor& row_ptr_in,
                      const at::Tensor& col_idx_in, const std::optional<at::Tensor>& bias) {
  const char* op = "fmkernels::bsr_mm";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (M, K), got ", x_in.sizes());
  TORCH_CHECK(blocks_in.dim() == 3 && blocks_in.size(1) == blocks_in.size(2), op,
              ": blocks must be (nnzb, b, b), got ", blocks_in.sizes());
  const int b = static_cast<int>(blocks_in.size(1));
  TORCH_CHECK(b == 16 || b == 32 || b == 64, op, ": block size must be 16, 32 or 64, got ", b);
  TORCH_CHECK(x_in.size(1) % b == 0, op, ": K=", x_in.size(1), " must be a multiple of the block size ", b);
  TORCH_CHECK(row_ptr_in.scalar_type() == at::kInt && col_idx_in.scalar_type() == at::kInt, op,
              ": row_ptr and col_idx must be int32");
  TORCH_CHECK(col_idx_in.numel() == blocks_in.size(0), op, ": col_idx must have one entry per block");
  TORCH_CHECK(x_in.scalar_type() == blocks_in.scalar_type(), op, ": x and blocks must share a dtype");
  const at::Tensor x = x_in.contiguous(), blocks = blocks_in.contiguous();
  const at::Tensor row_ptr = row_ptr_in.contiguous(), col_idx = col_idx_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), nbr = row_ptr.size(0) - 1, N = nbr * b;
  at::Tensor y32 = at::zeros({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0) {
    const int32_t* rp = row_ptr.data_ptr<int32_t>();
    const int32_t* ci = col_idx.data_ptr<int32_t>();
    TORCH_CHECK(rp[0] == 0 && rp[nbr] == blocks.size(0), op, ": row_ptr must run from 0 to nnzb");
    for (int64_t i = 0; i < blocks.size(0); ++i)
      TORCH_CHECK(ci[i] >= 0 && ci[i] < K / b, op, ": col_idx[", i, "]=", ci[i], " out of range [0, ", K / b, ")");
    float* yp = y32.data_ptr<float>();
    const bool avx512 = use_avx512();
    const int64_t npanel = (M + kPanel - 1) / kPanel;
    std::vector<float> xt(static_cast<size_t>(npanel) * K * kPanel);
    FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bsr_mm_cpu", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* bp = blocks.data_ptr<scalar_t>();
      at::parallel_for(0, npanel, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          pack_panel<scalar_t>(xp, xt.data() + p * K * kPanel, p * kPanel, std::min<int64_t>(kPanel, M - p * kPanel), K);
      });
      for (int64_t p = 0; p < npanel; ++p) {
        const int64_t m0 = p * kPanel, rows = std::min<int64_t>(kPanel, M - m0);
        at::parallel_for(0, nbr, 1, [&](int64_t r0, int64_t r1) {
          bsr_rows<scalar_t>(xt.data() + p * K * kPanel, bp, rp, ci, yp, r0, r1, b, m0, rows, N, avx512);
        });
      }
    });
  }
  if (bias.has_value()) y32.add_(bias->to(at::kFloat));
  return y32.scalar_type() == x.scalar_type() ? y32 : y32.to(x.scalar_type());
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) { m.impl("bsr_mm", &fmk::cpu::bsr_mm_cpu); }
