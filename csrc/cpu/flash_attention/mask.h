// Which keys each query row sees (Mask: causal / sliding window / key range) and the segment tables every
// kernel runs over (Seg: one attention problem on rows of (B, H, N, D)-shaped operands).
#pragma once

#include <utility>
#include <vector>

#include "cpu/flash_attention/common.h"

namespace fmk::cpu::flash_attn {

// Which keys each query row sees (FlashAttention-2 bottom-right alignment), within keys [klo, khi) (a padded
// batch's valid keys; [0, nk) otherwise).
struct Mask {
  int64_t nq, nk, off, left, right;  // off = nk - nq; left/right < 0: unbounded
  int64_t klo = 0, khi = -1;         // khi < 0: nk
  static Mask of(int64_t nq, int64_t nk, int64_t left, int64_t right, int64_t klo = 0, int64_t khi = -1) {
    Mask m{nq, nk, nk - nq, left, right, klo, khi < 0 ? nk : khi};
    return m;
  }
  int64_t lo(int64_t i) const { return std::max<int64_t>(klo, left < 0 ? 0 : i + off - left); }
  int64_t hi(int64_t i) const { return std::min<int64_t>(khi, right < 0 ? nk : i + off + right + 1); }
  // Query rows [first, second) that see at least one key of [j0, j1) (empty: first >= second).
  std::pair<int64_t, int64_t> rows_of_keys(int64_t j0, int64_t j1) const {
    j0 = std::max(j0, klo);
    j1 = std::min(j1, khi);
    if (j1 <= j0) return {0, 0};
    return {right < 0 ? 0 : std::max<int64_t>(0, j0 - off - right), left < 0 ? nq : std::min<int64_t>(nq, j1 - off + left)};
  }
  // True when every (row in [r0, r1), key in [j0, j0 + BK)) pair is visible (and j0 + BK <= nk).
  bool full(int64_t r0, int64_t r1, int64_t j0) const {
    return j0 + BK <= nk && lo(r1 - 1) <= j0 && hi(r0) >= j0 + BK;
  }
  // Sets the scores of invisible pairs to -inf (tile rows r0.., keys j0..j0+BK).
  void apply(float* s, int64_t r0, int64_t m, int64_t j0) const {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t a = std::clamp<int64_t>(lo(r0 + i) - j0, 0, BK);
      const int64_t b = std::clamp<int64_t>(hi(r0 + i) - j0, 0, BK);
      float* row = s + i * BK;
      if (b <= a) {
        std::fill(row, row + BK, kNegInf);
        continue;
      }
      std::fill(row, row + a, kNegInf);
      std::fill(row + b, row + BK, kNegInf);
    }
  }
  // Same on a transposed tile st (BK keys x BQ queries, row-major): key j0 + j, queries r0 + i.
  void apply_t(float* st, int64_t r0, int64_t j0) const {
    for (int64_t j = 0; j < BK; ++j) {
      const auto [qa, qb] = rows_of_keys(j0 + j, j0 + j + 1);
      const int64_t a = std::clamp<int64_t>(qa - r0, 0, BQ);
      const int64_t b = std::clamp<int64_t>(qb - r0, 0, BQ);
      float* row = st + j * BQ;
      if (b <= a) {
        std::fill(row, row + BQ, kNegInf);
        continue;
      }
      std::fill(row, row + a, kNegInf);
      std::fill(row + b, row + BQ, kNegInf);
    }
  }
};

// A causal diagonal block (fp32 paths): when the first kHalf query rows of a full BQ-row tile see no key past
// the block's first kHalf, their scores, softmax and products run over kHalf keys: 3/4 of the block's work.
// B 8, H 6, N 256, D 64 causal (10 blocks per head, 4 of them diagonal), 2 threads, medians of 40 alternating
// calls: fwd 4.04 -> 3.84 ms, bwd 8.33 -> 7.84 ms. (Also splits a last key block with <= kHalf keys left.)
constexpr int64_t kHalf = BK / 2;
inline bool diagonal_split(const Mask& mask, int64_t r0, int64_t m, int64_t j0) {
  return m == BQ && mask.hi(r0 + kHalf - 1) <= j0 + kHalf;
}

// ================================================================ segments
// Every kernel below runs over a list of segments: one attention problem each, on rows of (B, H, N, D)-shaped
// operands. The dense op has one segment per batch entry; the varlen op views its packed (total, H, D) operands
// as (1, H, total, D) and has one segment per sequence (cu_seqlens); a padded batch with per-entry key ranges
// keeps the dense layout with a key range in each segment's mask.
struct Seg {
  int64_t b;    // batch index in the (B, H, ...) operands
  int64_t q0;   // first query row in the unpadded q-side rows (q, out, lse, delta, dq)
  int64_t qp0;  // first query row in the padded q-side buffers (bf16 backward; multiple of BQ)
  int64_t nq;
  int64_t k0;   // first key row in the padded key buffers (multiple of BK)
  int64_t ko;   // first key row in the unpadded k-side rows (k, v, dk, dv)
  int64_t nk;
  Mask mask;
  int64_t nqb() const { return (nq + BQ - 1) / BQ; }
  int64_t nkb() const { return (nk + BK - 1) / BK; }
};

namespace {

// Larger problems first, so that the shared task counter does not end on one long sequence.
void order_by_cost(std::vector<Seg>& segs) {
  std::stable_sort(segs.begin(), segs.end(), [](const Seg& a, const Seg& b) { return a.nq * a.nk > b.nq * b.nk; });
}

// Segment tables. dense: one per batch entry, key range [kstart[b], kend[b]) when given (else all keys).
// B * one (nq, nk) problem; padded buffers have round_up(nk, BK) key rows and round_up(nq, BQ) query rows.
std::vector<Seg> dense_segments(int64_t B, int64_t Nq, int64_t Nk, int64_t left, int64_t right,
                                const int32_t* kstart = nullptr, const int32_t* kend = nullptr) {
  std::vector<Seg> segs(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t klo = kstart ? kstart[b] : 0, khi = kend ? kend[b] : Nk;
    segs[b] = Seg{b, 0, 0, Nq, 0, 0, Nk, Mask::of(Nq, Nk, left, right, klo, khi)};
  }
  return segs;
}

// varlen: sequence s has queries [cq[s], cq[s+1]) and keys [ck[s], ck[s+1]) of the packed operands (checked
// here again, so that a bad table cannot make a kernel read out of bounds). Returns the padded row counts.
std::vector<Seg> varlen_segments(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t Tq, int64_t Tk, int64_t left,
                                 int64_t right, int64_t* NQP, int64_t* NKP, const char* op) {
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt, op,
              ": cu_seqlens_q and cu_seqlens_k must be int32");
  TORCH_CHECK(cu_q.device().is_cpu() && cu_k.device().is_cpu(), op, ": cu_seqlens must be CPU tensors");
  TORCH_CHECK(cu_q.dim() == 1 && cu_k.dim() == 1 && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1, op,
              ": cu_seqlens_q and cu_seqlens_k must be 1-D of the same length batch + 1, got ", cu_q.sizes(), " and ",
              cu_k.sizes());
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* pq = cq.const_data_ptr<int32_t>();
  const int32_t* pk = ck.const_data_ptr<int32_t>();
  const int64_t S = cq.numel() - 1;
  TORCH_CHECK(pq[0] == 0 && pk[0] == 0 && pq[S] == Tq && pk[S] == Tk, op,
              ": cu_seqlens must start at 0 and end at the total rows (", Tq, " queries, ", Tk, " keys)");
  std::vector<Seg> segs;
  segs.reserve(S);
  int64_t qp = 0, kp = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t nq = int64_t(pq[s + 1]) - pq[s], nk = int64_t(pk[s + 1]) - pk[s];
    TORCH_CHECK(nq >= 0 && nk >= 0, op, ": cu_seqlens must be non-decreasing (sequence ", s, ")");
    segs.push_back(Seg{0, pq[s], qp, nq, kp, pk[s], nk, Mask::of(nq, nk, left, right)});
    qp += round_up(nq, BQ);
    kp += round_up(nk, BK);
  }
  *NQP = std::max<int64_t>(qp, BQ);
  *NKP = std::max<int64_t>(kp, BK);
  return segs;
}

}  // namespace
}  // namespace fmk::cpu::flash_attn
