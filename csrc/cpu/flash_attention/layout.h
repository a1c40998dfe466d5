// Operand layouts, built once per call with ATen or AVX-512 loops (linear in N): row views of (B, H, N, D)
// tensors read in place, padded copies, K^T panels, bf16 pair panels, per-segment packing, output stores.
#pragma once

#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/flash_attention/mask.h"

namespace fmk::cpu::flash_attn {
namespace {

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

// Software prefetch of rows [0, m) of `cols` elements, `sn` apart (the hardware prefetchers do not follow rows
// 1-2 KB apart).
template <typename T>
inline void prefetch_rows(const T* src, int64_t sn, int64_t m, int64_t cols) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < cols * int64_t(sizeof(T)); c += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(src + i * sn) + c, 0, 3);
}

// Rows [0, m) of `cols` elements, `sn` apart, as a contiguous tile: `src` itself when they already are, else
// copied to `buf` (m * cols). For tiles a kernel reads many times: rows 1-2 KB apart (varlen's (total, H, D)
// rows at H8 D64) fall into a few L1 sets; the bf16 forward's fused Q K^T + softmax took 17% more samples on
// such a strided Q tile than on a contiguous one (8 x 1024 causal, perf, Zen 4). The copy itself is bound by
// the first touch of the rows (~2 us per 64-row bf16 tile there), not by the copying.
template <typename T>
const T* tile_rows(const T* src, int64_t sn, int64_t m, int64_t cols, T* buf) {
  if (sn == cols) return src;
  prefetch_rows(src, sn, m, cols);  // all the misses in flight at once, then the copy
  for (int64_t i = 0; i < m; ++i) std::memcpy(buf + i * cols, src + i * sn, cols * sizeof(T));
  return buf;
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

// fp32 (B, H, Np, Dp) -> per key block (D, BK) panels: (B, H, Np/BK, Dp, BK). Rows read in place (any
// strides, unit d stride; varlen's (1, H, total, D) views included), 16 x 16 tiles through a stack buffer.
// ATen's permute copy of a (1, 8, 8192, 64) strided view: ~2x the samples of the same copy from a contiguous
// (8, 8, 1024, 64) tensor (perf, 1 thread, loaded Zen 4), which made varlen's forward ~3% slower than dense.
FMK_AVX512 void transpose_panel_avx512(const float* s, int64_t sn, int64_t Dp, float* d) {
  for (int64_t j0 = 0; j0 < BK; j0 += 16)
    for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
      alignas(64) float t[16][16];
      for (int64_t j = 0; j < 16; ++j) _mm512_store_ps(t[j], _mm512_loadu_ps(s + (j0 + j) * sn + d0));
      for (int64_t c = 0; c < 16; ++c) {
        const __m512i idx = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
        _mm512_storeu_ps(d + (d0 + c) * BK + j0, _mm512_i32gather_ps(idx, &t[0][c], 4));
      }
    }
}
void transpose_panel_portable(const float* s, int64_t sn, int64_t Dp, float* d) {
  for (int64_t j = 0; j < BK; ++j)
    for (int64_t c = 0; c < Dp; ++c) d[c * BK + j] = s[j * sn + c];
}
at::Tensor block_transpose(const at::Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), Np = x.size(2), Dp = x.size(3), nb = Np / BK;
  if (x.scalar_type() != at::kFloat || x.stride(3) != 1 || Np % BK != 0 || Dp % 16 != 0)
    return x.unflatten(2, {nb, BK}).transpose(3, 4).contiguous();
  at::Tensor out = at::empty({B, H, nb, Dp, BK}, x.options());
  const float* src = x.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), sn = x.stride(2);
  const bool vec = use_avx512();
  at::parallel_for(0, B * H * nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t bh = blk / nb;
      const float* s = src + (bh / H) * sb + (bh % H) * sh + (blk % nb) * BK * sn;
      if (vec)
        transpose_panel_avx512(s, sn, Dp, dst + blk * Dp * BK);
      else
        transpose_panel_portable(s, sn, Dp, dst + blk * Dp * BK);
    }
  });
  return out;
}

// bf16 (B, H, Np, Dp) -> pair panels over d, per key block: (B, H, Np/BK, Dp/2, BK, 2). A 32-bit transpose of
// each (BK, Dp/2) block; ATen's generic permute copy took 2.7 ms for (4, 8, 1024, 64) on 1 core, this ~0.3 ms.
// The source may be any view with a unit d stride (even row / head strides): varlen's packed (1, H, total, D)
// operands are read in place rather than copied to (H, total, D) first (8 x 1024 rows, H8 D64: one 8 MiB pass
// less per operand).
template <int64_t P>
static inline void transpose_block_u32(const uint32_t* s, uint32_t* d, int64_t p_dyn, int64_t ld) {
  const int64_t np = P > 0 ? P : p_dyn;
  for (int64_t p = 0; p < np; ++p)
    for (int64_t j = 0; j < BK; ++j) d[p * BK + j] = s[j * ld + p];
}
FMK_AVX512 void pairs_over_d_avx512(const uint32_t* s, uint32_t* d, int64_t np, int64_t ld) {
  if (np == 32)
    transpose_block_u32<32>(s, d, np, ld);
  else
    transpose_block_u32<0>(s, d, np, ld);
}
void pairs_over_d_portable(const uint32_t* s, uint32_t* d, int64_t np, int64_t ld) {
  transpose_block_u32<0>(s, d, np, ld);
}

// bf16 (B, H, Np, Dp), Np even -> pair panels over rows: (B, H, Np/2, Dp, 2) (rows 2i and 2i+1 interleaved).
// Any source strides with a unit d stride (rows ld elements apart).
static inline void interleave_rows_u16(const uint16_t* s, uint32_t* d, int64_t rows2, int64_t Dp, int64_t ld) {
  for (int64_t i = 0; i < rows2; ++i) {
    const uint16_t* a = s + 2 * i * ld;
    const uint16_t* b = a + ld;
    uint32_t* o = d + i * Dp;
    for (int64_t j = 0; j < Dp; ++j) o[j] = static_cast<uint32_t>(a[j]) | (static_cast<uint32_t>(b[j]) << 16);
  }
}
FMK_AVX512 void pairs_over_rows_avx512(const uint16_t* s, uint32_t* d, int64_t rows2, int64_t Dp, int64_t ld) {
  interleave_rows_u16(s, d, rows2, Dp, ld);
}
void pairs_over_rows_portable(const uint16_t* s, uint32_t* d, int64_t rows2, int64_t Dp, int64_t ld) {
  interleave_rows_u16(s, d, rows2, Dp, ld);
}

// x: bf16 with a unit d stride; the pair layouts read it in place when every other stride is even and the data
// 4-byte aligned (32-bit pairs), else from a contiguous copy.
at::Tensor pairable(const at::Tensor& x) {
  const bool ok = x.stride(3) == 1 && x.stride(0) % 2 == 0 && x.stride(1) % 2 == 0 && x.stride(2) % 2 == 0 &&
                  reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 4 == 0;
  return ok ? x : x.contiguous();
}

// Token-major: the rows of all heads adjacent, a head's rows far apart (head stride below the row stride:
// varlen's (total, H, D) rows, 1 KB apart at H8 D64 bf16).
inline bool token_major(const at::Tensor& x) {
  return x.size(1) > 1 && x.size(2) > 1 && std::abs(x.stride(1)) < std::abs(x.stride(2));
}

// The pair layouts of a token-major bf16 x (B, H, Np, Dp), Np % BK == 0, Dp even, pairable: per (b, key block),
// head by head (neighbouring memory), the block's rows gathered into an L1 tile, then laid out into over_d
// (pairs_over_d's layout) and / or over_rows (pairs_over_rows'), whichever is given. The transpose's column walk
// straight over 64 rows 1 KB apart missed L1 on every read (4 sets); the backward reads Q and dO once for both.
void pairs_from_tiles(const at::Tensor& x, at::Tensor* over_d, at::Tensor* over_rows) {
  const int64_t B = x.size(0), H = x.size(1), Np = x.size(2), Dp = x.size(3), nb = Np / BK, np = Dp / 2;
  const bf16* src = x.const_data_ptr<bf16>();
  uint32_t* dst_d = over_d ? reinterpret_cast<uint32_t*>(over_d->data_ptr<bf16>()) : nullptr;
  uint32_t* dst_r = over_rows ? reinterpret_cast<uint32_t*>(over_rows->data_ptr<bf16>()) : nullptr;
  const int64_t sb = x.stride(0), sh = x.stride(1), sn = x.stride(2);
  const bool vec = use_avx512();
  at::parallel_for(0, B * nb, 1, [&](int64_t w0, int64_t w1) {
    std::vector<bf16> tile(BK * Dp);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / nb, blk = w % nb;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t bh = b * H + h;
        const bf16* rows = tile_rows(src + b * sb + h * sh + blk * BK * sn, sn, BK, Dp, tile.data());
        if (dst_d) {
          const uint32_t* pairs = reinterpret_cast<const uint32_t*>(rows);
          uint32_t* od = dst_d + (bh * nb + blk) * BK * np;
          if (vec)
            pairs_over_d_avx512(pairs, od, np, np);
          else
            pairs_over_d_portable(pairs, od, np, np);
        }
        if (dst_r) {
          const uint16_t* halves = reinterpret_cast<const uint16_t*>(rows);
          uint32_t* orow = dst_r + (bh * (Np / 2) + blk * (BK / 2)) * Dp;
          if (vec)
            pairs_over_rows_avx512(halves, orow, BK / 2, Dp, Dp);
          else
            pairs_over_rows_portable(halves, orow, BK / 2, Dp, Dp);
        }
      }
    }
  });
}

at::Tensor pairs_over_d(const at::Tensor& x0) {
  const at::Tensor x = pairable(x0);
  const int64_t B = x.size(0), H = x.size(1), Np = x.size(2), Dp = x.size(3), nb = Np / BK, np = Dp / 2;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && Np % BK == 0 && Dp % 2 == 0);
  at::Tensor out = at::empty({B, H, nb, np, BK, 2}, x.options());
  if (token_major(x)) {
    pairs_from_tiles(x, &out, nullptr);
    return out;
  }
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.const_data_ptr<bf16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<bf16>());
  const int64_t sb = x.stride(0) / 2, sh = x.stride(1) / 2, sn = x.stride(2) / 2;  // in pairs
  const bool vec = use_avx512();
  at::parallel_for(0, B * H * nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t bh = blk / nb, b = bh / H, h = bh % H;
      const uint32_t* s = src + b * sb + h * sh + (blk % nb) * BK * sn;
      if (vec)
        pairs_over_d_avx512(s, dst + blk * BK * np, np, sn);
      else
        pairs_over_d_portable(s, dst + blk * BK * np, np, sn);
    }
  });
  return out;
}

at::Tensor pairs_over_rows(const at::Tensor& x0) {
  const at::Tensor x = x0.stride(3) == 1 ? x0 : x0.contiguous();
  const int64_t B = x.size(0), H = x.size(1), Np = x.size(2), Dp = x.size(3);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && Np % 2 == 0);
  at::Tensor out = at::empty({B, H, Np / 2, Dp, 2}, x.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr<bf16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<bf16>());
  const int64_t sb = x.stride(0), sh = x.stride(1), sn = x.stride(2);
  const bool vec = use_avx512();
  const int64_t chunk = 32;  // row pairs per work item (within one (b, h))
  const int64_t per_bh = (Np / 2 + chunk - 1) / chunk, nchunks = B * H * per_bh;
  if (token_major(x)) {
    // rows of all heads are adjacent: walk the source in memory order, row pair outer and head inner (the
    // (b, h)-major walk read each head's rows 1 KB apart: 1.9x the samples, 8 x 1024 rows H8 D64)
    at::parallel_for(0, B * per_bh, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c / per_bh, i0 = (c % per_bh) * chunk, i1 = std::min(i0 + chunk, Np / 2);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t h = 0; h < H; ++h) {
            const uint16_t* s = src + b * sb + h * sh + 2 * i * sn;
            uint32_t* d = dst + ((b * H + h) * (Np / 2) + i) * Dp;
            if (vec)
              pairs_over_rows_avx512(s, d, 1, Dp, sn);
            else
              pairs_over_rows_portable(s, d, 1, Dp, sn);
          }
      }
    });
    return out;
  }
  at::parallel_for(0, nchunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t bh = c / per_bh, i0 = (c % per_bh) * chunk, n = std::min(chunk, Np / 2 - i0);
      const uint16_t* s = src + (bh / H) * sb + (bh % H) * sh + 2 * i0 * sn;
      uint32_t* d = dst + (bh * (Np / 2) + i0) * Dp;
      if (vec)
        pairs_over_rows_avx512(s, d, n, Dp, sn);
      else
        pairs_over_rows_portable(s, d, n, Dp, sn);
    }
  });
  return out;
}

// Both pair layouts of one bf16 operand, {pairs_over_d(x), pairs_over_rows(x)}: a token-major source (the bf16
// backward's Q and dO read in place from varlen's rows) is read once for both (two strided passes became one).
std::pair<at::Tensor, at::Tensor> pairs_over_d_and_rows(const at::Tensor& x0) {
  const at::Tensor x = pairable(x0);
  const int64_t B = x.size(0), H = x.size(1), Np = x.size(2), Dp = x.size(3);
  if (!token_major(x) || Np % BK != 0) return {pairs_over_d(x), pairs_over_rows(x)};
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && Dp % 2 == 0);
  at::Tensor over_d = at::empty({B, H, Np / BK, Dp / 2, BK, 2}, x.options());
  at::Tensor over_rows = at::empty({B, H, Np / 2, Dp, 2}, x.options());
  pairs_from_tiles(x, &over_d, &over_rows);
  return {over_d, over_rows};
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

// The same with non-temporal 64-byte stores: rows of d * sizeof(T) % 64 == 0 bytes at 64-byte aligned addresses.
// For outputs whose rows are far apart (varlen's (total, H, D) dq / dk / dv / out, rows 1 KB apart at H8 D64
// bf16): the write-allocate reads of such rows are not prefetched; store_rows took 2.7x the samples of the
// contiguous case's (bf16 backward, 8 x 1024 causal, perf on Zen 4).
template <typename T>
FMK_AVX512 void stream_rows_avx512(const float* src, int64_t lds, int64_t m, int64_t d, float mul, T* dst,
                                   int64_t ldd) {
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < m; ++i) {
    const float* s = src + i * lds;
    T* o = dst + i * ldd;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t j = 0; j < d; j += 16) _mm512_stream_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), vm));
    } else {
      for (int64_t j = 0; j < d; j += 32) {
        alignas(64) T pair[32];
        store16(pair, _mm512_mul_ps(_mm512_loadu_ps(s + j), vm));
        store16(pair + 16, _mm512_mul_ps(_mm512_loadu_ps(s + j + 16), vm));
        _mm512_stream_si512(reinterpret_cast<__m512i*>(o + j), _mm512_load_si512(pair));
      }
    }
  }
  _mm_sfence();
}

template <typename T>
void store_rows(bool vec, const float* src, int64_t lds, int64_t m, int64_t d, float mul, T* dst, int64_t ldd) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per 64-byte line
  if (vec && ldd > d && d % kLine == 0 && ldd % kLine == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0)
    return stream_rows_avx512(src, lds, m, d, mul, dst, ldd);
  if (vec) return store_rows_avx512(src, lds, m, d, mul, dst, ldd);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < d; ++j) dst[i * ldd + j] = static_cast<T>(src[i * lds + j] * mul);
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
// Same on the query side (each sequence a whole number of query blocks: the padded query rows are the rows).
bool queries_in_place(const std::vector<Seg>& segs, int64_t NQ, int64_t NQP) {
  if (NQ != NQP) return false;
  for (const Seg& s : segs)
    if (s.qp0 != s.q0 || s.nq % BQ != 0) return false;
  return true;
}

// x (B, H, N, D) any strides (unit d stride) -> `dtype` (B, H, N, Dp) contiguous, the same rows (zero columns
// past D). Parallel over (b, h, 64-row chunk).
template <typename T, typename U>
void copy_rows(const T* src, int64_t ssb, int64_t ssh, int64_t ssn, int64_t B, int64_t H, int64_t N, int64_t D,
               int64_t Dp, U* dst) {
  const int64_t per_bh = (N + 63) / 64;
  at::parallel_for(0, B * H * per_bh, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / per_bh, r0 = (task % per_bh) * 64, r1 = std::min(N, r0 + 64);
      const T* sp = src + (bh / H) * ssb + (bh % H) * ssh;
      U* dp = dst + bh * N * Dp;
      for (int64_t r = r0; r < r1; ++r) {
        const T* x = sp + r * ssn;
        U* d = dp + r * Dp;
        int64_t j = 0;
        if constexpr (std::is_same_v<T, U>) {
          std::memcpy(d, x, D * sizeof(T));
          j = D;
        } else {
          for (; j < D; ++j) d[j] = static_cast<U>(static_cast<float>(x[j]));
        }
        for (; j < Dp; ++j) d[j] = U(0.0f);
      }
    }
  });
}

at::Tensor rows_contiguous(const at::Tensor& x0, int64_t Dp, at::ScalarType dtype) {
  const at::Tensor x = x0.stride(3) == 1 ? x0 : x0.contiguous();
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  at::Tensor out = at::empty({B, H, N, Dp}, x.options().dtype(dtype));
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rows_contiguous", [&] {
    const scalar_t* sp = x.const_data_ptr<scalar_t>();
    if (dtype == at::kFloat)
      copy_rows<scalar_t, float>(sp, x.stride(0), x.stride(1), x.stride(2), B, H, N, D, Dp, out.data_ptr<float>());
    else
      copy_rows<scalar_t, bf16>(sp, x.stride(0), x.stride(1), x.stride(2), B, H, N, D, Dp, out.data_ptr<bf16>());
  });
  return out;
}

}  // namespace
}  // namespace fmk::cpu::flash_attn
