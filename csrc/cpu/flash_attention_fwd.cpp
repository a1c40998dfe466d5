// Tiled flash attention forward on CPU (fp32 and bf16 paths) over segments; see flash_attention.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu/flash_attention/flash_attention.h"
#include "cpu/flash_attention/layout.h"
#include "cpu/flash_attention/tiles.h"
#include "cpu/flash_attention/tiles_bf16.h"

namespace fmk::cpu::flash_attn {
namespace {

struct FwdTask {
  int64_t B, Hq, Hkv, NQ, NKP, nkb, D, Dp;  // NQ: q-side rows per head; NKP: padded key rows per head
  std::vector<Seg> segs;
  std::vector<int64_t> start;  // first task of each segment (Hq * nqb tasks each), then the total
  float scale;                 // softmax_scale (fp32 path: natural-log units)
  float c;                     // bf16 path: softmax_scale * log2(e); fp32 path: softmax_scale
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

// m: row maxima in natural-log units (fp32 path) or log2 units (bf16 path, `log2_units`).
void fwd_finalize(float* O, int64_t Dp, const float* m, const float* l, int64_t M, float* lse, const Kernels& kn,
                  bool log2_units) {
  for (int64_t i = 0; i < M; ++i) {
    if (l[i] == 0.0f) {
      std::fill(O + i * Dp, O + (i + 1) * Dp, 0.0f);
      lse[i] = kNegInf;
    } else {
      kn.scale_row(O + i * Dp, Dp, 1.0f / l[i]);
      lse[i] = log2_units ? (m[i] + std::log2(l[i])) * kLn2 : m[i] + std::log(l[i]);
    }
  }
}

template <typename T>
void fwd_fp32(const FwdTask& t, Rows<float> Qr, const float* Kt, Rows<float> Vr, OutRows<T> out, float* lse) {
  const Kernels kn = kernels();
  const int64_t grp = t.Hq / t.Hkv, ntask = t.start.back();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(ntask), 1, [&](int64_t, int64_t) {
    std::vector<float> S(BQ * BK), O(BQ * t.Dp), m(BQ), l(BQ), Qbuf(BQ * t.Dp);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      int64_t h, qb;
      const Seg& sg = t.locate(task, &h, &qb);
      const Mask& mask = sg.mask;
      const int64_t b = sg.b, bh = b * t.Hq + h, bhk = b * t.Hkv + h / grp;
      const int64_t r0 = qb * BQ, M = std::min(BQ, sg.nq - r0);
      const float* Q = tile_rows(Qr.row(bh, sg.q0 + r0), Qr.sn, M, t.Dp, Qbuf.data());
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
          kn.abt(rows, keys, t.D, Q + i0 * t.Dp, t.Dp, ktb, BK, s, BK);
          if (!full) mask.apply(s, r0 + i0, rows, j0);
          for (int64_t i = i0; i < i0 + rows; ++i) {
            const float alpha = kn.softmax_row(S.data() + i * BK, keys, t.scale, &m[i], &l[i]);
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
      fwd_finalize(O.data(), t.Dp, m.data(), l.data(), M, lse + bh * t.NQ + sg.q0 + r0, kn, false);
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
    std::vector<bf16> P(BQ * BK), Qbuf(BQ * t.Dp);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      int64_t h, qb;
      const Seg& sg = t.locate(task, &h, &qb);
      const Mask& mask = sg.mask;
      const int64_t b = sg.b, bh = b * t.Hq + h, bhk = b * t.Hkv + h / grp;
      const int64_t r0 = qb * BQ, M = std::min(BQ, sg.nq - r0);
      const bf16* Q = tile_rows(Qr.row(bh, sg.q0 + r0), Qr.sn, M, t.Dp, Qbuf.data());
      std::fill(O.begin(), O.begin() + M * t.Dp, 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(lv.begin(), lv.end(), 0.0f);
      const int64_t klo = mask.lo(r0), khi = mask.hi(r0 + M - 1);
      for (int64_t kb = klo / BK; kb * BK < khi; ++kb) {
        const int64_t j0 = kb * BK;
        const bf16* ktp = Ktp + (bhk * t.nkb + sg.k0 / BK + kb) * t.Dp * BK;
        if (M == BQ && t.c > 0.0f && mask.full(r0, r0 + M, j0)) {
          qk_softmax_fused_bf16(t.Dp / 2, Q, t.Dp, ktp, t.c, m.data(), lv.data(), O.data(), t.Dp, P.data());
        } else {
          gemm_bf16_avx512(M, BK, t.Dp / 2, Q, t.Dp, 2, ktp, BK, S.data(), BK, false);
          mask.apply(S.data(), r0, M, j0);
          softmax_tile_bf16(S.data(), M, t.c, m.data(), lv.data(), O.data(), t.Dp, P.data());
        }
        gemm_bf16_avx512<BK, 2>(M, t.Dp, BK / 2, P.data(), BK, 2, Vp + (bhk * t.NKP + sg.k0 + j0) * t.Dp, t.Dp,
                                O.data(), t.Dp, true);
      }
      reduce_rows16_avx512(lv.data(), M, l.data());
      fwd_finalize(O.data(), t.Dp, m.data(), l.data(), M, lse + bh * t.NQ + sg.q0 + r0, kn, true);
      store_rows(kn.vec, O.data(), t.Dp, M, t.D, 1.0f, out.row(b, h, sg.q0 + r0), out.sn);
    }
  });
}

}  // namespace

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
  t.scale = static_cast<float>(scale);
  t.plan();
  if (t.start.back() == 0) return;
  const auto keys = [&](const at::Tensor& x, at::ScalarType dt) {
    return dense ? padded(x, NKP, t.Dp, dt) : pack_segments(x, t.segs, true, NKP, t.Dp, dt);
  };
  float* lp = lse.data_ptr<float>();
  // varlen: sequences that are whole key blocks (k0 == ko) are read where they are, else packed per segment.
  const bool kin = !dense && keys_in_place(t.segs, kv.size(2), NKP);
  if (use_bf16_path(qv)) {
    // Q read in place when it already is bf16 rows of Dp elements (any row / head strides)
    const bool q_in_place = qv.scalar_type() == at::kBFloat16 && t.D == t.Dp && qv.stride(3) == 1;
    const at::Tensor Qb = q_in_place ? qv
                          : dense    ? padded(qv, t.NQ, t.Dp, at::kBFloat16)
                                     : rows_contiguous(qv, t.Dp, at::kBFloat16);
    // the pair panels read bf16 keys in place (any strides) when they need no padding
    const auto pair_src = [&](const at::Tensor& x) {
      return kin && x.scalar_type() == at::kBFloat16 && t.D == t.Dp ? x : keys(x, at::kBFloat16);
    };
    const at::Tensor Ktp = pairs_over_d(pair_src(kv));
    const at::Tensor Vp = pairs_over_rows(pair_src(vv));
    fwd_bf16(t, rows_of<bf16>(Qb), Ktp.const_data_ptr<bf16>(), Vp.const_data_ptr<bf16>(),
             out_rows<bf16>(outv), lp);
    return;
  }
  at::Tensor qk, kk, vk;
  const Rows<float> Qr = rows_f32(qv, t.NQ, t.Dp, qk);
  Rows<float> Vr;
  if (dense || kin) {
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

}  // namespace fmk::cpu::flash_attn
