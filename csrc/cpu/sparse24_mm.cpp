// 2:4 semi-structured sparse matmul on CPU: y = x @ W^T (+ bias), W (N, K) stored as values (N, K/2) + meta
// int32 (N, ceil(K/32)) (2-bit in-group positions, 16 per word; layout in fmkernels/reference/sparse.py).
//
// Two AVX-512 kernels, picked by M (rows of x); FMK_SPARSE24_KERNEL=stream|outer forces one (tests, benchmarks):
//  - "stream" (M < 12, memory-bound): walks W rows in pairs; for each 16 columns of x (one zmm) the 8 kept values
//    of row n and the 8 of row n+1 share a vpermps (single source) whose index comes from the two meta words
//    (srlv + ternlog); lanes 0-7 accumulate row n, 8-15 row n+1. W is read once per 4 rows of x as K/2 values +
//    K/8 bytes of meta. (Single-row fallback for odd rows: vpermt2ps over 32 columns; FMK_SPARSE24_PAIRS=0
//    selects it for every row.) 1.5-2.2x dense at M = 1, 1 and 2 threads.
//  - "outer" (M >= 12, compute-bound): x^T packed once per call in 64-row panels; each kept value is broadcast
//    and FMA'd into its row's accumulators with the x^T row of its column as the memory operand: no shuffles,
//    half the FMAs of the dense product (details at outer_word). N = K = 4096, 1 thread, vs nn.Linear:
//    M = 16 2.1x, 32 2.0-2.2x, 64 1.8-1.9x, 256 1.35-1.46x, 2048 0.93x (the stream kernel it replaced at
//    M >= 12: 1.16x at M = 64). Crossover with stream (1 thread): M = 11 stream 6.5 ms vs outer 7.6 ms,
//    M = 12 7.4 vs 6.4 ms.
// Also the backward pieces: sampled grad for the kept values only (grad_values[n, j] = sum_m gy[m,n] x[m,c]).
// Parallel over output rows n (chunks handed out dynamically: parallel_rows); portable scalar fallback when
// AVX-512 is off.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>
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

// ---------------------------------------------------------------- AVX-512 "outer" kernel (M >= kOuterMinM)
//
// x^T is packed once per call in panels of MP = 16 * MB rows of x (xt[k * MP + i] = x[m0 + i, k], zero padded).
// Each kept value v = W[n, c] is broadcast and FMA'd into the MB accumulators of row n with the x^T row c as
// the memory operand: MB FMAs + MB zmm loads + 1 broadcast per kept value, no shuffles, half the FMAs of the
// dense product. R rows of W are interleaved (R * MB independent accumulator chains; with 4 chains of one row
// the FMA latency bounds the loop: 1.2x dense at M = 64 vs 1.5-2x with 8 chains, 1 core). Blocking: NB rows
// of W x KB columns; the x^T slice (KB * MP * 4 bytes, 8-16 KB) stays in L1 while NB rows walk it, the row
// accumulators live in yacc (NB, MP) between K blocks, and the next K block of each W row is prefetched
// (without it KB = 64 ran at 0.55x the speed of KB = 32: NB rows of W 8 KB apart share L1 sets).
constexpr int kOuterNB = 24;

template <typename T>
FMK_AVX512 static inline const float* word_values(const T* vr, int64_t jv, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (jv == 16) return vr;
  }
  _mm512_store_ps(buf, jv == 16 ? load16(vr) : load16(vr, tail_mask(jv)));
  return buf;
}

// One 32-column meta word of R rows: acc[r][j] += sum_i v[r][i] * xt[col(r, i)][16 j .. 16 j + 15].
template <int MB, int R>
FMK_AVX512 static inline void outer_word(const float* xb, const float* const* vr, const uint32_t* words,
                                         __m512 (*acc)[MB]) {
  constexpr int MP = 16 * MB;
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* xr = xb + (4 * (i >> 1) + ((words[r] >> (2 * i)) & 3u)) * MP;
      const __m512 b = _mm512_set1_ps(vr[r][i]);
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xr + 16 * j), acc[r][j]);
    }
  }
}

// Rows n .. n + R - 1 over meta words w0 .. w1 - 1 (the last word of a row may be partial: K % 32 != 0).
template <typename T, int MB, int R>
FMK_AVX512 void outer_rows(const float* xt, const T* vals, const int32_t* meta, float* ya, int64_t n, int64_t K,
                           int64_t w0, int64_t w1, bool first) {
  constexpr int MP = 16 * MB;
  const int64_t half = K / 2, nw = (K + 31) / 32;
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(ya + r * MP + 16 * j);
  alignas(64) float buf[R][16];
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t jv = std::min<int64_t>(16, half - w * 16);
    uint32_t words[R];
    const float* vr[R];
    for (int r = 0; r < R; ++r) {
      const T* row = vals + (n + r) * half + w * 16;
      _mm_prefetch(reinterpret_cast<const char*>(row + (w1 - w0) * 16), _MM_HINT_T0);  // this row, next K block
      words[r] = static_cast<uint32_t>(meta[(n + r) * nw + w]);
      vr[r] = word_values(row, jv, buf[r]);
    }
    if (jv == 16) {
      outer_word<MB, R>(xt + w * 32 * MP, vr, words, acc);
    } else {
      for (int64_t i = 0; i < jv; ++i)
        for (int r = 0; r < R; ++r) {
          const float* xr = xt + (w * 32 + 4 * (i >> 1) + ((words[r] >> (2 * i)) & 3u)) * MP;
          const __m512 b = _mm512_set1_ps(vr[r][i]);
          for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xr + 16 * j), acc[r][j]);
        }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) _mm512_storeu_ps(ya + r * MP + 16 * j, acc[r][j]);
}

// MB = 1, 2: 4 rows at a time; MB = 3, 4: 2 rows. KB * MP * 4 bytes of x^T per K block.
template <int MB> constexpr int outer_r() { return MB <= 2 ? 4 : 2; }
template <int MB> constexpr int outer_kb() { return MB == 1 ? 256 : MB == 2 ? 128 : 64; }

// y[m0 .. m0 + rows, n0 .. n1] for one x^T panel.
template <typename T, int MB>
FMK_AVX512 void outer_panel(const float* xt, const T* vals, const int32_t* meta, float* y, int64_t m0, int64_t rows,
                            int64_t n0, int64_t n1, int64_t K, int64_t N) {
  constexpr int MP = 16 * MB, R = outer_r<MB>(), KB = outer_kb<MB>();
  const int64_t nw = (K + 31) / 32;
  alignas(64) float yacc[kOuterNB * MP];
  for (int64_t nb = n0; nb < n1; nb += kOuterNB) {
    const int64_t ne = std::min<int64_t>(n1, nb + kOuterNB);
    for (int64_t w0 = 0; w0 < nw; w0 += KB / 32) {
      const int64_t w1 = std::min<int64_t>(nw, w0 + KB / 32);
      int64_t n = nb;
      for (; n + R <= ne; n += R) outer_rows<T, MB, R>(xt, vals, meta, yacc + (n - nb) * MP, n, K, w0, w1, w0 == 0);
      for (; n < ne; ++n) outer_rows<T, MB, 1>(xt, vals, meta, yacc + (n - nb) * MP, n, K, w0, w1, w0 == 0);
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t n = nb; n < ne; ++n) y[(m0 + i) * N + n] = yacc[(n - nb) * MP + i];
  }
}

template <typename T>
FMK_AVX512 void outer_rows_all(const float* xt, const T* vals, const int32_t* meta, float* y, int64_t M, int64_t n0,
                               int64_t n1, int64_t K, int64_t N, int64_t mp) {
  for (int64_t m0 = 0; m0 < M; m0 += mp) {
    const int64_t rows = std::min<int64_t>(mp, M - m0);
    const float* xp = xt + m0 * K;  // panel m0 / mp, (K, mp)
    switch ((rows + 15) / 16) {
      case 4: outer_panel<T, 4>(xp, vals, meta, y, m0, rows, n0, n1, K, N); break;
      case 3: outer_panel<T, 3>(xp, vals, meta, y, m0, rows, n0, n1, K, N); break;
      case 2: outer_panel<T, 2>(xp, vals, meta, y, m0, rows, n0, n1, K, N); break;
      default: outer_panel<T, 1>(xp, vals, meta, y, m0, rows, n0, n1, K, N); break;
    }
  }
}

// Panels of mp rows (the last one padded to a multiple of 16): xt[m0 * K + k * mpp + i] = x[m0 + i, k].
template <typename T>
void pack_xt(const T* x, float* xt, int64_t M, int64_t K, int64_t ldx, int64_t mp, int64_t k0, int64_t k1) {
  for (int64_t m0 = 0; m0 < M; m0 += mp) {
    const int64_t rows = std::min<int64_t>(mp, M - m0), mpp = (rows + 15) / 16 * 16;
    float* panel = xt + m0 * K;
    for (int64_t kb = k0; kb < k1; kb += 64) {  // the destination block stays in L1
      const int64_t ke = std::min<int64_t>(k1, kb + 64);
      for (int64_t i = 0; i < rows; ++i) {
        const T* xr = x + (m0 + i) * ldx;
        for (int64_t k = kb; k < ke; ++k) panel[k * mpp + i] = static_cast<float>(xr[k]);
      }
      for (int64_t k = kb; k < ke; ++k)
        for (int64_t i = rows; i < mpp; ++i) panel[k * mpp + i] = 0.0f;
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

// Rows [0, N) in chunks of `chunk` handed out by a shared counter to torch's threads (dynamic schedule): on the
// shared cores a thread that loses its core for a time slice no longer holds back a fixed half of the rows
// (static halves: M = 1 at 2 threads ran 0.55-0.73x dense in some benchmark runs, 1.3-1.5x in others). Each
// output row is still computed by one thread with the same arithmetic: the result does not depend on the schedule.
template <typename F>
void parallel_rows(int64_t N, int64_t chunk, const F& fn) {
  const int64_t nchunks = (N + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nchunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) fn(c * chunk, std::min(N, (c + 1) * chunk));
  });
}

// Which kernel: FMK_SPARSE24_KERNEL=stream|outer overrides (benchmarks); default by M.
constexpr int64_t kOuterMinM = 12;  // stream below, outer from here (crossover measured: see the header comment)
int64_t outer_min_m() {
  const char* e = std::getenv("FMK_SPARSE24_KERNEL");
  if (e && std::string(e) == "stream") return INT64_MAX;
  if (e && std::string(e) == "outer") return 0;
  return kOuterMinM;
}

at::Tensor sparse24_mm_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& meta_in,
                           const std::optional<at::Tensor>& bias) {
  check_args(x_in, values_in, meta_in, "fmkernels::sparse24_mm");
  TORCH_CHECK(x_in.scalar_type() == values_in.scalar_type(), "fmkernels::sparse24_mm: x and values must share a dtype, got ",
              x_in.scalar_type(), " and ", values_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), meta = meta_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  // every kernel writes all of y when K > 0
  at::Tensor y32 = K > 0 ? at::empty({M, N}, x.options().dtype(at::kFloat)) : at::zeros({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0 && K > 0) {
    float* yp = y32.data_ptr<float>();
    const int32_t* mp = meta.data_ptr<int32_t>();
    const bool avx512 = use_avx512();
    FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "sparse24_mm_cpu", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* vp = values.data_ptr<scalar_t>();
      if (!avx512) {
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { portable_rows<scalar_t>(xp, vp, mp, yp, M, n0, n1, K, N, K); });
      } else if (M < outer_min_m()) {
        // One thread: the stream kernel is memory-bound, and on the shared cores waking torch's second thread
        // (OMP_WAIT_POLICY=PASSIVE) and waiting for it at the region's barrier cost more than it brings:
        // M = 1, N = K = 4096: 1 thread 2.2-2.5 ms, 2 threads 8-24 ms (min 2.4 ms), dense nn.Linear 3.4 ms either way.
        stream_kernel<scalar_t>(xp, vp, mp, yp, M, 0, N, K, N, K);
      } else {
        constexpr int64_t mp_max = 64;  // rows of x per panel
        // (K, 16 * ceil(M / 16)) in 64-row panels, 64-byte aligned (c10's allocator): each x^T row slice is
        // whole cache lines
        at::Tensor xt_t = at::empty({(M + 15) / 16 * 16 * K}, x.options().dtype(at::kFloat));
        float* xt = xt_t.data_ptr<float>();
        at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) { pack_xt<scalar_t>(xp, xt, M, K, K, mp_max, k0, k1); });
        parallel_rows(N, 4 * kOuterNB, [&](int64_t n0, int64_t n1) {
          outer_rows_all<scalar_t>(xt, vp, mp, yp, M, n0, n1, K, N, mp_max);
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
