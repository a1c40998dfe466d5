// Tiled flash attention backward on CPU (fp32 and bf16 paths) over segments; see flash_attention.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/flash_attention/flash_attention.h"
#include "cpu/flash_attention/layout.h"
#include "cpu/flash_attention/tiles.h"
#include "cpu/flash_attention/tiles_bf16.h"

namespace fmk::cpu::flash_attn {
namespace {

// Flat row f of the walk -> delta index bh * N + n. Token-major operands (head stride below the row stride:
// varlen's (total, H, D) rows, transposed (B, N, H, D) projections) are walked in memory order, n outer and h
// inner: walking each head's rows 1-2 KB apart cost 4.6x the samples of the contiguous walk (fp32, 8 x 1024
// rows H8 D64: +6.6 ms of a ~200 ms fwd+bwd, perf on Zen 4).
struct RowWalk {
  int64_t H, N;
  bool token_major;
  int64_t operator()(int64_t f) const {
    if (!token_major) return f;
    const int64_t b = f / (H * N), rem = f % (H * N);
    return (b * H + rem % H) * N + rem / H;
  }
};

// delta[bh * N + i] = sum_d dO[bh][i][d] * O[bh][i][d] for the walk's flat rows [r0, r1) (fp32 accumulation).
// fp32: one FMA chain over d in order, as the dP = dO V^T tile computes each entry, so that a row that sees a
// single key (O = v exactly) gets dP - delta = 0 exactly, as PyTorch's softmax backward does (the vector sum left
// ~1 ulp there: dk 5x PyTorch's error vs fp64). D scalar FMAs per row: ~1 ms of a ~100 ms B4 H8 N1024 backward.
template <typename T>
FMK_AVX512 void delta_rows_avx512(Rows<T> dO, Rows<T> O, RowWalk walk, float* delta, int64_t r0, int64_t r1,
                                  int64_t D) {
  const int64_t N = walk.N;
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t f = r0; f < r1; ++f) {
      const int64_t r = walk(f);
      const float* a = dO.row(r / N, r % N);
      const float* o = O.row(r / N, r % N);
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc = std::fma(a[d], o[d], acc);
      delta[r] = acc;
    }
    return;
  }
  for (int64_t f = r0; f < r1; ++f) {
    const int64_t r = walk(f);
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

template <typename T>  // (a sequential unfused sum, as the portable dP tile's)
void delta_rows_portable(Rows<T> dO, Rows<T> O, RowWalk walk, float* delta, int64_t r0, int64_t r1, int64_t D) {
  const int64_t N = walk.N;
  for (int64_t f = r0; f < r1; ++f) {
    const int64_t r = walk(f);
    const T* a = dO.row(r / N, r % N);
    const T* o = O.row(r / N, r % N);
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc += static_cast<float>(a[d]) * static_cast<float>(o[d]);
    delta[r] = acc;
  }
}

struct BwdTask {
  int64_t B, Hq, Hkv, NQ, NQP, NKP, nkb, D, Dp, G;  // NQ: q-side rows per head; NQP: padded (bf16) q rows
  int64_t max_nkb, max_qrows;  // over segments: key blocks; query rows rounded up to BQ
  std::vector<Seg> segs;
  float c;      // bf16 path: softmax_scale * log2(e) (P = 2^(S c - lse2))
  float scale;  // fp32 path: P = e^(S scale - lse), natural units as the forward's (see softmax_row_avx512)
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

// The fp32 lse is m + ln l rounded to fp32: off by up to half an ulp, 3e-5 at |lse| = 1e3 (q scale 1e3 in the
// fuzz), which scales every p of the row alike, so on a near one-hot row p_dom = 1 +- 3e-5 where SDPA's is 1 to
// the fp32 ulp (dV broke the 2x rule). Rows with |lse| >= kLseExact get corr = ln sum_k e^(s_k scale - lse) over
// the backward's own scores (fp64 sum), and the backward uses p = e^((s scale - lse) - corr), whose row sums to 1 to
// fp32 rounding. Below 64 the rounding is at most 2^-18 of p, under the scores' own rounding at such |s|.
// scripts/attention_2x_rule_rates.py, 400 fp32 fuzz-like cases at q scale 1e3 breaking the 2x rule: 38 before
// (dv 27), 8-13 after; SDPA against itself with the head dim permuted (the same math, another fp32 summation
// order) breaks it in 75: what is left is the scores' own rounding, which no kernel chooses.
// Cost: none while every |lse| < 64 (one scan of lse); else one more Q K^T tile GEMM over the flagged rows' (query
// block, key block) pairs (fp32 B1 H8 N2048 D64 causal with every row flagged, q scale 100: bwd 57 -> 70 ms, +22%).
constexpr float kLseExact = 64.0f;

std::vector<float> lse_corrections(const BwdTask& t, Rows<float> Qr, const float* Kt, const float* lse,
                                   const Kernels& kn) {
  const auto flagged = [](float l) { return std::isfinite(l) && std::abs(l) >= kLseExact; };
  const int64_t npair = int64_t(t.segs.size()) * t.Hq, grp = t.Hq / t.Hkv;
  std::vector<uint8_t> need(npair, 0);
  bool any = false;
  for (int64_t p = 0; p < npair; ++p) {
    const Seg& sg = t.segs[p / t.Hq];
    const float* l = lse + (sg.b * t.Hq + p % t.Hq) * t.NQ + sg.q0;
    for (int64_t r = 0; r < sg.nq && !need[p]; ++r) need[p] = flagged(l[r]);
    any = any || need[p];
  }
  if (!any) return {};
  std::vector<float> corr(t.B * t.Hq * t.NQ, 0.0f);
  at::parallel_for(0, npair, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> S(BQ * BK);
    std::vector<double> mass;
    for (int64_t p = p0; p < p1; ++p) {
      if (!need[p]) continue;
      const Seg& sg = t.segs[p / t.Hq];
      const int64_t h = p % t.Hq, bh = sg.b * t.Hq + h, bhk = sg.b * t.Hkv + h / grp;
      const float* l = lse + bh * t.NQ + sg.q0;
      mass.assign(sg.nq, 0.0);
      for (int64_t kb = 0; kb < sg.nkb(); ++kb) {
        const int64_t j0 = kb * BK;
        const auto [qlo, qhi] = sg.mask.rows_of_keys(j0, std::min(j0 + BK, sg.nk));
        const float* ktb = Kt + (bhk * t.nkb + sg.k0 / BK + kb) * t.Dp * BK;
        for (int64_t r0 = qlo; r0 < qhi; r0 += BQ) {  // the backward's query blocks (same tiles, same scores)
          const int64_t M = std::min(BQ, qhi - r0);
          if (std::none_of(l + r0, l + r0 + M, flagged)) continue;
          kn.abt(M, BK, t.D, Qr.row(bh, sg.q0 + r0), Qr.sn, ktb, BK, S.data(), BK);
          if (!sg.mask.full(r0, r0 + M, j0)) sg.mask.apply(S.data(), r0, M, j0);
          for (int64_t i = 0; i < M; ++i)
            if (flagged(l[r0 + i])) mass[r0 + i] += kn.row_mass(S.data() + i * BK, BK, t.scale, l[r0 + i]);
        }
      }
      float* c = corr.data() + bh * t.NQ + sg.q0;
      for (int64_t r = 0; r < sg.nq; ++r)
        if (flagged(l[r]) && mass[r] > 0.0 && std::isfinite(mass[r])) c[r] = static_cast<float>(std::log(mass[r]));
    }
  });
  return corr;
}

template <typename T>
void bwd_fp32(const BwdTask& t, Rows<float> Qr, Rows<float> dOr, const float* Kt, const float* Vt, Rows<float> Kr,
              const float* lse2, const float* delta, float* dq_acc, OutRows<T> dq, OutRows<T> dk, OutRows<T> dv,
              float scale) {
  const Kernels kn = kernels();
  const std::vector<float> corr = lse_corrections(t, Qr, Kt, lse2, kn);
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
    const float* corrs = corr.empty() ? nullptr : corr.data() + bh * t.NQ + sg.q0;
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
        kn.bwd_row(S + i * BK, dP + i * BK, i < top ? top_keys : BK, t.scale, lse2s[r0 + i],
                   corrs ? corrs[r0 + i] : 0.0f, deltas[r0 + i]);
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

// A key block's BK contiguous rows of Dp bf16 -> rows paired (BK / 2, Dp, 2), the layout pairs_over_rows gives.
const bf16* pair_rows_tile(const bf16* rows, int64_t Dp, bf16* out) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(rows);
  uint32_t* d = reinterpret_cast<uint32_t*>(out);
  if (use_avx512())
    pairs_over_rows_avx512(s, d, BK / 2, Dp, Dp);
  else
    pairs_over_rows_portable(s, d, BK / 2, Dp, Dp);
  return out;
}

// bf16 path: tiles are computed transposed (S^T = K Q^T, dP^T = V dO^T) so that P^T and dS^T come out
// row-major for dV += P^T dO and dK += dS^T Q; dS K reads dS^T re-paired over keys (Z). Query blocks are
// aligned to BQ (the Q^T / dO^T pair panels are blocked; each segment starts a block); padded query columns
// have lse2 = +inf (P = 0).
void bwd_bf16(const BwdTask& t, Rows<bf16> Kb, Rows<bf16> Vb, const bf16* Qt, const bf16* dOt, const bf16* Qr,
              const bf16* dOr, const bf16* Kr, const float* lse2, const float* delta, float* dq_acc, OutRows<bf16> dq,
              OutRows<bf16> dk, OutRows<bf16> dv, float scale) {
  struct Scratch {
    std::vector<float> ST, dPT;
    std::vector<bf16> PT, dST, Z;  // PT / dST: one BK x BQ block per query block of the key block
    std::vector<bf16> Kt, Vt;      // the key block's K / V rows when they are read in place (strided)
    std::vector<bf16> Kp;          // and its K rows re-paired over rows (BK / 2, Dp, 2) for dS K
  };
  const int64_t nqb = std::max<int64_t>(t.max_qrows / BQ, 1);
  const auto make_scratch = [&] {
    return Scratch{std::vector<float>(BK * BQ), std::vector<float>(BK * BQ), std::vector<bf16>(nqb * BK * BQ),
                   std::vector<bf16>(nqb * BK * BQ), std::vector<bf16>(BK * BQ),
                   std::vector<bf16>(Kb.sn == t.Dp ? 0 : BK * t.Dp), std::vector<bf16>(Vb.sn == t.Dp ? 0 : BK * t.Dp),
                   std::vector<bf16>(Kr ? 0 : BK * t.Dp)};
  };
  bwd_tasks(t, t.NQP, true, dq_acc, dq, dk, dv, scale, make_scratch,
            [&](Scratch& sc, const Seg& sg, int64_t bh, int64_t bhk, int64_t kb, float* dka, float* dva, float* dQ) {
    const Mask& mask = sg.mask;
    const int64_t j0 = kb * BK;
    const auto [qa, qhi] = mask.rows_of_keys(j0, std::min(j0 + BK, sg.nk));
    if (qa >= qhi) return;
    const int64_t qlo = qa / BQ * BQ;
    const bf16* kb_rows = tile_rows(Kb.row(bhk, sg.k0 + j0), Kb.sn, BK, t.Dp, sc.Kt.data());
    const bf16* vb_rows = tile_rows(Vb.row(bhk, sg.k0 + j0), Vb.sn, BK, t.Dp, sc.Vt.data());
    if (Kb.sn != t.Dp && kb + t.G < sg.nkb()) prefetch_rows(Kb.row(bhk, sg.k0 + j0 + t.G * BK), Kb.sn, BK, t.Dp);
    if (Vb.sn != t.Dp && kb + t.G < sg.nkb()) prefetch_rows(Vb.row(bhk, sg.k0 + j0 + t.G * BK), Vb.sn, BK, t.Dp);
    const bf16* krb = Kr ? Kr + (bhk * t.NKP + sg.k0 + j0) * t.Dp : pair_rows_tile(kb_rows, t.Dp, sc.Kp.data());
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
  if (dense || queries_in_place(segs, x.size(2), NQP))
    return x.size(2) == NQP ? x : at::constant_pad_nd(x, {0, NQP - x.size(2)}, fill);
  at::Tensor out = at::full({x.size(0), x.size(1), NQP}, fill, x.options());
  for (const Seg& s : segs)
    if (s.nq > 0) out.select(0, s.b).narrow(1, s.qp0, s.nq).copy_(x.select(0, s.b).narrow(1, s.q0, s.nq));
  return out;
}

}  // namespace

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
  t.scale = static_cast<float>(scale);
  const float fscale = static_cast<float>(scale);
  const int64_t B = t.B, Hq = t.Hq, NQ = t.NQ, D = t.D;
  const bool bf16_path = use_bf16_path(q);
  t.NQP = bf16_path ? NQP : NQ;
  // delta = rowsum(dO * O) in fp32; lse2 = lse * log2(e) (bf16 path) or lse (fp32 path, natural units), +inf on
  // rows that see no key (so P = 0 there) and on padded rows. A NaN lse (a NaN or +inf score in the forward)
  // stays NaN: the row's gradients go NaN as SDPA's do.
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
      const RowWalk walk{Hq, NQ, token_major(dOc)};
      at::parallel_for(0, B * Hq * NQ, 256, [&](int64_t r0, int64_t r1) {
        if (avx512)
          delta_rows_avx512<scalar_t>(a, o, walk, dp, r0, r1, D);
        else
          delta_rows_portable<scalar_t>(a, o, walk, dp, r0, r1, D);
      });
    });
  }
  at::Tensor lse2 = bf16_path ? lse.to(at::kFloat) * kLog2e : lse.to(at::kFloat);
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

  // varlen: sequences that are whole blocks are read where they are (k0 == ko, qp0 == q0).
  const bool kin = !dense && keys_in_place(t.segs, k.size(2), NKP);
  if (bf16_path) {
    const bool qin = !dense && q.scalar_type() == at::kBFloat16 && D == t.Dp && queries_in_place(t.segs, NQ, t.NQP);
    // Q and dO only feed the pair panels, which read bf16 rows in place (any strides)
    const auto queries = [&](const at::Tensor& x) {
      return qin      ? x
             : dense ? padded(x, t.NQP, t.Dp, at::kBFloat16)
                     : pack_segments(x, t.segs, false, t.NQP, t.Dp, at::kBFloat16);
    };
    const at::Tensor Qb = queries(q), dOb = queries(grad_out);
    // K / V read in place (key blocks copied per task) when the sequences are whole key blocks: packing them
    // cost 2 x 8 MiB of fresh pages per call at 8 x 1024 rows H8 D64
    const bool kv_in_place = kin && D == t.Dp && k.scalar_type() == at::kBFloat16 && k.stride(3) == 1 &&
                             v.scalar_type() == at::kBFloat16 && v.stride(3) == 1;
    const at::Tensor Kb = kv_in_place ? k : keys(k, at::kBFloat16), Vb = kv_in_place ? v : keys(v, at::kBFloat16);
    // BQ == BK: the pair panels over d share the key blocking. Q and dO in one pass each (one read of each row).
    const auto [Qt, Qr] = pairs_over_d_and_rows(Qb);
    const auto [dOt, dOr] = pairs_over_d_and_rows(dOb);
    // K re-paired per key block from the gathered rows when K is read in place, else in one pass here
    const at::Tensor Kr = kv_in_place && Kb.stride(2) != t.Dp ? at::Tensor() : pairs_over_rows(Kb);
    bwd_bf16(t, rows_of<bf16>(Kb), rows_of<bf16>(Vb), Qt.const_data_ptr<bf16>(),
             dOt.const_data_ptr<bf16>(), Qr.const_data_ptr<bf16>(), dOr.const_data_ptr<bf16>(),
             Kr.defined() ? Kr.const_data_ptr<bf16>() : nullptr, lse2.const_data_ptr<float>(),
             delta.const_data_ptr<float>(), dq_acc_p,
             out_rows<bf16>(dqv), out_rows<bf16>(dkv), out_rows<bf16>(dvv), fscale);
  } else {
    at::Tensor qk, dok, kk, vk;
    const Rows<float> Qr = rows_f32(q, NQ, t.Dp, qk), dOr = rows_f32(grad_out, NQ, t.Dp, dok);
    Rows<float> Kr;
    if (dense || kin) {
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
  // dQ = scale * sum over chunks (fixed order) of the fp32 partials, summed in place into partial 0 (no
  // dq_acc.sum(0) temporary; the peak is earlier: out, dq, dk, dv, the K / V layouts and dq_acc, measured fp32
  // 2.35 KB per (token, head) at B1 H8 N2048 D64 vs SDPA's 2.16, bf16 1.88 vs 0.96).
  if (t.G > 1) {
    at::Tensor acc0 = dq_acc.select(0, 0);
    for (int64_t g = 1; g < t.G; ++g) acc0.add_(dq_acc.select(0, g));
    const at::Tensor sum = acc0.narrow(3, 0, D).mul_(fscale);  // (B, Hq, NQP, D)
    if (!bf16_path) {
      dqv.copy_(sum);
    } else {
      for (const Seg& s : t.segs)
        if (s.nq > 0) dqv.select(0, s.b).narrow(1, s.q0, s.nq).copy_(sum.select(0, s.b).narrow(1, s.qp0, s.nq));
    }
  }
}

}  // namespace fmk::cpu::flash_attn
