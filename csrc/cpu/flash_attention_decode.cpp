// Flash attention forward for few query rows (decoding): split-K over keys read in place; see flash_attention.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu/flash_attention/flash_attention.h"
#include "cpu/flash_attention/tiles.h"

namespace fmk::cpu::flash_attn {
namespace {

constexpr int64_t kDecodeSub = 256;  // keys per softmax sub-block inside a chunk

struct DecodeTask {
  int64_t B, Hq, Hkv, Nq, Nk, D, R, nchunk, chunk;
  int64_t ks[3], vs[3];  // k / v strides (batch, head, row); the head dim is contiguous
  Mask mask;
  float c;
};

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

// One key chunk [c0, c1) of kv head (b, hk) for the R query rows Qr (R x D fp32, contiguous; row r = query head
// hk*grp + r / Nq, query r % Nq). Writes the chunk's unnormalized Oc (R x D), running max mc (log2 units) and
// sum lc.
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
      float m_new = max_nan(mc[r], _mm512_reduce_max_ps(mx));  // a NaN row max: the row goes NaN
      if (m_new == kNegInf) {  // (rare) nothing visible, unless vmaxps dropped a NaN next to masked scores
        for (j = 0; j < n; ++j)
          if (std::isnan(srow[j])) m_new = srow[j];
      }
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
          M = max_nan(M, part[(bhk * t.nchunk + ch) * R * (D + 2) + R * D + r]);
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

}  // namespace

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
  // The chunks' fp32 partials (R x (D + 2) floats each) stay within 8x the output's bytes (issue 21: they were
  // up to 33x fp32 / 66x bf16 at B * Hkv = 1); with q's fp32 copy the temporaries are <= 10x the output.
  const int64_t max_chunks = std::max<int64_t>(1, 8 * D * q.element_size() / (4 * (D + 2)));
  t.nchunk = std::clamp<int64_t>((32 + B * Hkv - 1) / (B * Hkv), 1,
                                 std::max<int64_t>(1, std::min<int64_t>(max_chunks, Nk / kDecodeSub)));
  t.chunk = round_up((Nk + t.nchunk - 1) / t.nchunk, 16);
  t.nchunk = (Nk + t.chunk - 1) / t.chunk;
  t.mask = Mask::of(Nq, Nk, window_left, window_right);
  t.c = static_cast<float>(scale) * kLog2e;
  FMK_DISPATCH_FLOAT_TYPES(q.scalar_type(), "flash_attention_fwd_decode", [&] {
    fwd_decode<scalar_t>(t, Qf.const_data_ptr<float>(), kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
}

}  // namespace fmk::cpu::flash_attn
