// 2:4 semi-structured sparse matmul on CPU: y = x @ W^T (+ bias), W (N, K) stored as values (N, K/2) + meta
// int32 (N, ceil(K/32)) (2-bit in-group positions, 16 per word; layout in fmkernels/reference/sparse.py).
//
// Two AVX-512 kernels, picked by M (rows of x):
//  - "stream" (M <= 128): walks W rows in pairs; for each 16 columns of x (one zmm) the 8 kept values of row n
//    and the 8 of row n+1 share a vpermps (single source) whose index comes from the two meta words (srlv +
//    ternlog); lanes 0-7 accumulate row n, 8-15 row n+1. (Single-row fallback for odd rows: vpermt2ps over 32
//    columns.) Measured 1.03-1.29x dense at M = 64, 1.5-1.8x at M = 1, 2-3.6x at M = 16 (N = K = 4096, 2 cores).
//    W is read once per 4 rows of x as K/2 values + K/8 bytes of meta. FMK_SPARSE24_PAIRS=0 selects the
//    single-row vpermt2ps variant for every row (benchmark knob); FMK_SPARSE24_KERNEL=stream|outer forces one.
//  - "outer" (larger M, compute-bound): x is packed once as x^T panels (K, 64 rows of x); each kept value
//    is broadcast and multiplied into the 64-row panel row of its column (4 FMAs with a memory operand per
//    kept value, no shuffles). Half the FMAs of the dense product.
// Also the backward pieces: sampled grad for the kept values only (grad_values[n, j] = sum_m gy[m,n] x[m,c]).
// Parallel over output rows n (at::parallel_for); portable scalar fallback when AVX-512 is off.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

inline int column_of(const int32_t* meta_row, int64_t j) {  // W column of kept value j
  const uint32_t w = static_cast<uint32_t>(meta_row[j >> 4]);
  return static_cast<int>(4 * (j >> 1) + ((w >> (2 * (j & 15))) & 3u));
}

// ---------------------------------------------------------------- AVX-512 "stream" kernel (small M)

FMK_AVX512 static inline __m512i perm_index(int32_t word) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i s = _mm512_srlv_epi32(_mm512_set1_epi32(word), shifts);
  // (s & 3) | base  (base is a multiple of 4)
  return _mm512_ternarylogic_epi32(s, _mm512_set1_epi32(3), base, 0xEA);
}

template <typename T, int MR, int NR>
FMK_AVX512 void stream_tile(const T* x, const T* vals, const int32_t* meta, float* y, int64_t m0, int64_t n0,
                            int64_t K, int64_t N, int64_t ldx) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t k0 = w * 32;
    const int64_t kv = std::min<int64_t>(32, K - k0);
    const int64_t jv = kv / 2;  // kept values in this chunk
    __m512 xlo[MR], xhi[MR];
    if (kv == 32) {
      for (int i = 0; i < MR; ++i) {
        xlo[i] = load16(x + (m0 + i) * ldx + k0);
        xhi[i] = load16(x + (m0 + i) * ldx + k0 + 16);
      }
    } else {
      const __mmask16 ml = tail_mask(std::min<int64_t>(16, kv)), mh = tail_mask(std::max<int64_t>(0, kv - 16));
      for (int i = 0; i < MR; ++i) {
        xlo[i] = load16(x + (m0 + i) * ldx + k0, ml);
        xhi[i] = mh ? load16(x + (m0 + i) * ldx + k0 + 16, mh) : _mm512_setzero_ps();
      }
    }
    const __mmask16 mv = tail_mask(jv);
    for (int r = 0; r < NR; ++r) {
      const T* vr = vals + (n0 + r) * half + w * 16;
      const __m512 v = jv == 16 ? load16(vr) : load16(vr, mv);
      const __m512i idx = perm_index(meta[(n0 + r) * nw + w]);
      for (int i = 0; i < MR; ++i) acc[i][r] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(xlo[i], idx, xhi[i]), acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) y[(m0 + i) * N + n0 + r] = _mm512_reduce_add_ps(acc[i][r]);
}

template <typename T, int NR>
FMK_AVX512 void stream_rows(const T* x, const T* vals, const int32_t* meta, float* y, int64_t M, int64_t n0,
                            int64_t K, int64_t N, int64_t ldx) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) stream_tile<T, 4, NR>(x, vals, meta, y, m, n0, K, N, ldx);
  switch (M - m) {
    case 3: stream_tile<T, 3, NR>(x, vals, meta, y, m, n0, K, N, ldx); break;
    case 2: stream_tile<T, 2, NR>(x, vals, meta, y, m, n0, K, N, ldx); break;
    case 1: stream_tile<T, 1, NR>(x, vals, meta, y, m, n0, K, N, ldx); break;
    default: break;
  }
}

// Row pairs with a single-source permute: a 16-column chunk of x (one zmm) holds the sources of 8 kept values of
// row n and 8 of row n + 1; lanes 0-7 of v / idx / acc belong to row n, lanes 8-15 to row n + 1. vpermps (one
// source) instead of vpermt2ps (two) per FMA.
template <typename T, int MR, int NP>
FMK_AVX512 void stream_pair_tile(const T* x, const T* vals, const int32_t* meta, float* y, int64_t m0, int64_t n0,
                                 int64_t K, int64_t N, int64_t ldx) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  const __m512i sh_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i sh_odd = _mm512_add_epi32(sh_even, _mm512_set1_epi32(16));
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  const int64_t nc = (K + 15) / 16;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t k0 = c * 16;
    const int64_t kv = std::min<int64_t>(16, K - k0), jv = kv / 2;
    const __mmask16 mx = tail_mask(kv), mv = tail_mask(jv);
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = kv == 16 ? load16(x + (m0 + i) * ldx + k0) : load16(x + (m0 + i) * ldx + k0, mx);
    for (int p = 0; p < NP; ++p) {
      const int64_t na = n0 + 2 * p, nb = na + 1;
      const __m512 va = load16(vals + na * half + c * 8, mv);
      const __m512 vb = load16(vals + nb * half + c * 8, mv);
      const __m512 v = _mm512_shuffle_f32x4(va, vb, 0x44);  // lanes 0-7 row na, 8-15 row nb
      const __m512i words = _mm512_mask_set1_epi32(_mm512_set1_epi32(meta[na * nw + (c >> 1)]), 0xFF00,
                                                   meta[nb * nw + (c >> 1)]);
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(words, (c & 1) ? sh_odd : sh_even), three, base, 0xEA);
      for (int i = 0; i < MR; ++i) acc[i][p] = _mm512_fmadd_ps(v, _mm512_permutexvar_ps(idx, xv[i]), acc[i][p]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) {
      y[(m0 + i) * N + n0 + 2 * p] = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(0x00FF, acc[i][p]));
      y[(m0 + i) * N + n0 + 2 * p + 1] = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(0xFF00, acc[i][p]));
    }
}

template <typename T>
FMK_AVX512 void stream_pair_rows(const T* x, const T* vals, const int32_t* meta, float* y, int64_t M, int64_t n0,
                                 int64_t K, int64_t N, int64_t ldx) {  // rows n0 .. n0 + 3
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) stream_pair_tile<T, 4, 2>(x, vals, meta, y, m, n0, K, N, ldx);
  switch (M - m) {
    case 3: stream_pair_tile<T, 3, 2>(x, vals, meta, y, m, n0, K, N, ldx); break;
    case 2: stream_pair_tile<T, 2, 2>(x, vals, meta, y, m, n0, K, N, ldx); break;
    case 1: stream_pair_tile<T, 1, 2>(x, vals, meta, y, m, n0, K, N, ldx); break;
    default: break;
  }
}

template <typename T>
FMK_AVX512 void stream_kernel(const T* x, const T* vals, const int32_t* meta, float* y, int64_t M, int64_t n0,
                              int64_t n1, int64_t K, int64_t N, int64_t ldx) {
  int64_t n = n0;
  if (std::getenv("FMK_SPARSE24_PAIRS") == nullptr || std::string(std::getenv("FMK_SPARSE24_PAIRS")) != "0")
    for (; n + 4 <= n1; n += 4) stream_pair_rows<T>(x, vals, meta, y, M, n, K, N, ldx);
  for (; n + 4 <= n1; n += 4) stream_rows<T, 4>(x, vals, meta, y, M, n, K, N, ldx);
  for (; n < n1; ++n) stream_rows<T, 1>(x, vals, meta, y, M, n, K, N, ldx);
}

// ---------------------------------------------------------------- AVX-512 "outer" kernel (larger M)

constexpr int kPanel = 64;  // rows of x per packed panel (4 zmm)
constexpr int kKBlock = 512;  // columns of W per pass (the x^T panel slice stays in L2; 64 measured slower: W strided)

// xt: (K, kPanel) fp32 panel; yacc: (rows n1-n0, kPanel) fp32 accumulators.
template <typename T, int MB>
FMK_AVX512 void outer_panel(const float* xt, const T* vals, const int32_t* meta, float* yacc, int64_t n0,
                            int64_t n1, int64_t K, int64_t kb0, int64_t kb1) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  alignas(64) int32_t cols[16];
  alignas(64) float vv[16];
  for (int64_t n = n0; n < n1; ++n) {
    float* ya = yacc + (n - n0) * kPanel;
    __m512 acc[MB];
    for (int j = 0; j < MB; ++j) acc[j] = _mm512_loadu_ps(ya + 16 * j);
    for (int64_t w = kb0 / 32; w < (kb1 + 31) / 32 && w < nw; ++w) {
      const int64_t jv = std::min<int64_t>(16, half - w * 16);
      const __m512i idx = _mm512_add_epi32(perm_index(meta[n * nw + w]), _mm512_set1_epi32(static_cast<int>(w * 32)));
      _mm512_store_si512(cols, _mm512_mullo_epi32(idx, _mm512_set1_epi32(kPanel)));
      const T* vr = vals + n * half + w * 16;
      _mm512_store_ps(vv, jv == 16 ? load16(vr) : load16(vr, tail_mask(jv)));
      for (int64_t i = 0; i < jv; ++i) {
        const __m512 b = _mm512_set1_ps(vv[i]);
        const float* xr = xt + cols[i];
        for (int j = 0; j < MB; ++j) acc[j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xr + 16 * j), acc[j]);
      }
    }
    for (int j = 0; j < MB; ++j) _mm512_storeu_ps(ya + 16 * j, acc[j]);
  }
}

template <typename T>
FMK_AVX512 void pack_xt(const T* x, float* xt, int64_t m0, int64_t rows, int64_t K, int64_t ldx) {
  // xt[k * kPanel + i] = x[m0 + i, k], zero for i >= rows
  for (int64_t k = 0; k < K; ++k) std::fill(xt + k * kPanel + rows, xt + (k + 1) * kPanel, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += 64) {  // k blocked: the destination block stays in L1
    const int64_t k1 = std::min<int64_t>(K, k0 + 64);
    for (int64_t i = 0; i < rows; ++i) {
      const T* xr = x + (m0 + i) * ldx;
      for (int64_t k = k0; k < k1; ++k) xt[k * kPanel + i] = static_cast<float>(xr[k]);
    }
  }
}

template <typename T>
FMK_AVX512 void outer_kernel_rows(const float* xt, const T* vals, const int32_t* meta, float* yacc, int64_t n0,
                                  int64_t n1, int64_t K, int mb) {
  for (int64_t kb = 0; kb < K; kb += kKBlock) {
    const int64_t kb1 = std::min<int64_t>(K, kb + kKBlock);
    switch (mb) {
      case 4: outer_panel<T, 4>(xt, vals, meta, yacc, n0, n1, K, kb, kb1); break;
      case 3: outer_panel<T, 3>(xt, vals, meta, yacc, n0, n1, K, kb, kb1); break;
      case 2: outer_panel<T, 2>(xt, vals, meta, yacc, n0, n1, K, kb, kb1); break;
      default: outer_panel<T, 1>(xt, vals, meta, yacc, n0, n1, K, kb, kb1); break;
    }
  }
}

// ---------------------------------------------------------------- portable

template <typename T>
void portable_rows(const T* x, const T* vals, const int32_t* meta, float* y, int64_t M, int64_t n0, int64_t n1,
                   int64_t K, int64_t N, int64_t ldx) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  std::vector<int> cols(half);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t j = 0; j < half; ++j) cols[j] = column_of(meta + n * nw, j);
    const T* vr = vals + n * half;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * ldx;
      float s = 0.f;
      for (int64_t j = 0; j < half; ++j) s += static_cast<float>(vr[j]) * static_cast<float>(xr[cols[j]]);
      y[m * N + n] = s;
    }
  }
}

// ---------------------------------------------------------------- launchers

void check_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && meta.device().is_cpu(), op,
              ": x, values and meta must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(values.dim() == 2 && values.size(1) * 2 == x.size(1), op, ": values must have shape (N, ",
              x.size(1) / 2, "), got ", values.sizes());
  TORCH_CHECK(x.size(1) % 4 == 0, op, ": K must be a multiple of 4, got ", x.size(1));
  TORCH_CHECK(meta.scalar_type() == at::kInt && meta.dim() == 2 && meta.size(0) == values.size(0) &&
                  meta.size(1) == (x.size(1) + 31) / 32,
              op, ": meta must be int32 of shape (", values.size(0), ", ", (x.size(1) + 31) / 32, "), got ",
              meta.scalar_type(), " ", meta.sizes());
}

// Which kernel: FMK_SPARSE24_KERNEL=stream|outer overrides (benchmarks); default by M.
int64_t stream_max_m() {
  const char* e = std::getenv("FMK_SPARSE24_KERNEL");
  if (e && std::string(e) == "stream") return INT64_MAX;
  if (e && std::string(e) == "outer") return 0;
  return 128;  // stream measured faster than outer up to M = 64 (2 cores Zen 4); beyond, dispatch picks dense anyway
}

at::Tensor sparse24_mm_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& meta_in,
                           const std::optional<at::Tensor>& bias) {
  check_args(x_in, values_in, meta_in, "fmkernels::sparse24_mm");
  TORCH_CHECK(x_in.scalar_type() == values_in.scalar_type(), "fmkernels::sparse24_mm: x and values must share a dtype, got ",
              x_in.scalar_type(), " and ", values_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), meta = meta_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  at::Tensor y32 = at::zeros({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0 && K > 0) {
    float* yp = y32.data_ptr<float>();
    const int32_t* mp = meta.data_ptr<int32_t>();
    const bool avx512 = use_avx512();
    FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "sparse24_mm_cpu", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* vp = values.data_ptr<scalar_t>();
      if (!avx512) {
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { portable_rows<scalar_t>(xp, vp, mp, yp, M, n0, n1, K, N, K); });
      } else if (M <= stream_max_m()) {
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { stream_kernel<scalar_t>(xp, vp, mp, yp, M, n0, n1, K, N, K); });
      } else {
        const int64_t npanel = (M + kPanel - 1) / kPanel;
        std::vector<float> xt(static_cast<size_t>(npanel) * K * kPanel);
        at::parallel_for(0, npanel, 1, [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p)
            pack_xt<scalar_t>(xp, xt.data() + p * K * kPanel, p * kPanel, std::min<int64_t>(kPanel, M - p * kPanel), K, K);
        });
        at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
          std::vector<float> yacc(static_cast<size_t>(n1 - n0) * kPanel);
          for (int64_t p = 0; p < npanel; ++p) {
            const int64_t rows = std::min<int64_t>(kPanel, M - p * kPanel);
            std::fill(yacc.begin(), yacc.end(), 0.0f);
            outer_kernel_rows<scalar_t>(xt.data() + p * K * kPanel, vp, mp, yacc.data(), n0, n1, K,
                                        static_cast<int>((rows + 15) / 16));
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t n = n0; n < n1; ++n) yp[(p * kPanel + i) * N + n] = yacc[(n - n0) * kPanel + i];
          }
        });
      }
    });
  }
  if (bias.has_value()) y32.add_(bias->to(at::kFloat));
  return y32.scalar_type() == x.scalar_type() ? y32 : y32.to(x.scalar_type());
}

// grad_values[n, j] = sum_m gy[m, n] * x[m, col(n, j)]: only the kept positions are computed.
FMK_AVX512 void sddmm_rows_avx512(const float* gyt, const float* xt, const int32_t* meta, float* gv, int64_t n0,
                                  int64_t n1, int64_t K, int64_t Mp) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const float* g = gyt + n * Mp;
    for (int64_t j = 0; j < half; ++j) {
      const float* xr = xt + static_cast<int64_t>(column_of(meta + n * nw, j)) * Mp;
      __m512 a = _mm512_setzero_ps();
      for (int64_t m = 0; m < Mp; m += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(g + m), _mm512_loadu_ps(xr + m), a);
      gv[n * half + j] = _mm512_reduce_add_ps(a);
    }
  }
}

void sddmm_rows_portable(const float* gyt, const float* xt, const int32_t* meta, float* gv, int64_t n0, int64_t n1,
                         int64_t K, int64_t Mp) {
  const int64_t half = K / 2, nw = (K + 31) / 32;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t j = 0; j < half; ++j) {
      const float* xr = xt + static_cast<int64_t>(column_of(meta + n * nw, j)) * Mp;
      float s = 0.f;
      for (int64_t m = 0; m < Mp; ++m) s += gyt[n * Mp + m] * xr[m];
      gv[n * half + j] = s;
    }
}

at::Tensor sparse24_sddmm_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& meta_in) {
  TORCH_CHECK(grad_y.dim() == 2 && x.dim() == 2 && grad_y.size(0) == x.size(0),
              "fmkernels::sparse24_sddmm: grad_y (M, N) and x (M, K) must share M, got ", grad_y.sizes(), " and ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = grad_y.size(1);
  TORCH_CHECK(K % 4 == 0, "fmkernels::sparse24_sddmm: K must be a multiple of 4, got ", K);
  TORCH_CHECK(meta_in.scalar_type() == at::kInt && meta_in.size(0) == N && meta_in.size(1) == (K + 31) / 32,
              "fmkernels::sparse24_sddmm: meta must be int32 (", N, ", ", (K + 31) / 32, "), got ", meta_in.sizes());
  const at::Tensor meta = meta_in.contiguous();
  const int64_t Mp = (M + 15) / 16 * 16;
  // (N, Mp) and (K, Mp) fp32, zero padded along M
  at::Tensor gyt = at::zeros({N, Mp}, grad_y.options().dtype(at::kFloat));
  at::Tensor xt = at::zeros({K, Mp}, x.options().dtype(at::kFloat));
  gyt.narrow(1, 0, M).copy_(grad_y.t());
  xt.narrow(1, 0, M).copy_(x.t());
  at::Tensor gv = at::empty({N, K / 2}, x.options().dtype(at::kFloat));
  if (N == 0 || K == 0) return gv;
  const float* gp = gyt.data_ptr<float>();
  const float* xp = xt.data_ptr<float>();
  const int32_t* mp = meta.data_ptr<int32_t>();
  float* out = gv.data_ptr<float>();
  const bool avx512 = use_avx512();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    if (avx512)
      sddmm_rows_avx512(gp, xp, mp, out, n0, n1, K, Mp);
    else
      sddmm_rows_portable(gp, xp, mp, out, n0, n1, K, Mp);
  });
  return gv;
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) {
  m.impl("sparse24_mm", &fmk::cpu::sparse24_mm_cpu);
  m.impl("sparse24_sddmm", &fmk::cpu::sparse24_sddmm_cpu);
}
