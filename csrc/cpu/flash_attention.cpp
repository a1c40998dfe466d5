// Flash attention forward and backward on CPU: O = softmax(Q K^T * scale + mask) V, tile by tile with an
// online softmax; the N x N score matrix is never formed (one BQ x BK tile per thread).
//
// q: (B, Hq, Nq, D), k/v: (B, Hkv, Nk, D), any strides, fp32/bf16/fp16; Hq % Hkv == 0 (GQA: query head h
// reads kv head h / (Hq / Hkv), no copies). Mask (FlashAttention-2, bottom-right aligned): query i sees key j
// when i + Nk - Nq - left <= j <= i + Nk - Nq + right (a negative bound is unbounded). Key blocks a query
// block cannot see are skipped; only blocks on the mask's edges are masked element by element.
// lse (B, Hq, Nq) fp32 natural-log log-sum-exp; rows that see no key give O = 0, lse = -inf.
//
// Compute: fp32 accumulation everywhere. Operands are re-laid out once per call (linear in N; the bf16 pair
// panels by AVX-512 loops, 2.7 -> ~0.3 ms per (4, 8, 1024, 64) tensor on 1 core vs ATen's permute copy):
//  - fp32 path (fp32 and fp16 inputs, or no AVX512-BF16): K^T / V^T packed per key block as (D, BK) panels
//    so Q K^T is a register-blocked 8 x 32 broadcast-FMA micro-kernel; P V, P^T dO, dS^T Q, dS K are 4 x 64
//    broadcast-FMA micro-kernels on row-major operands.
//  - bf16 path (bf16 inputs with AVX512-BF16): the same tiles with vdpbf16ps on operands packed into
//    (pair, 16 lanes, 2) layouts; P and dS are rounded to bf16 for their GEMMs (as FlashAttention-2 does). On
//    tiles without masked pairs the softmax (forward) and P^T / dS^T (backward) are computed from the score
//    accumulators in registers. The 8 x 32 vdpbf16ps tile runs at ~217 GFLOP/s per core in L1 (the chip's
//    peak: one 512-bit vdpbf16ps per cycle); the whole fwd+bwd reaches ~80% of that.
// exp is a vectorized 2^x (round + Chebyshev-fitted polynomial + vscalefps); the online softmax rescales the
// output only when a row's max grows by more than 2^8 (lazy rescaling).
// Forward: parallel over (batch, query head, query block); Nq <= 16 takes the split-K decoding
// path instead (see fwd_decode). Backward: parallel over (batch, kv head, key chunk); each task owns its dK/dV
// rows (summed over the query heads of its GQA group). With one chunk per (batch, kv head) (B * Hkv >= 16) a task
// owns its heads' dQ too and writes it directly; otherwise key blocks are dealt round-robin to G chunks
// (balanced under causal masks), each writing an fp32 dQ partial, summed in a fixed order afterwards. No atomic
// accumulation (tasks come from a shared counter, but each writes only its own outputs): bit-identical results
// run to run.
// Measured (2 cores Zen 4, B=4 H=8 N=1024 D=64, fwd+bwd vs F.scaled_dot_product_attention in the same run):
// see benchmarks/bench_attention.py and README.md.
//
// Files: flash_attention.cpp (this: op entry points, argument checks, registration), flash_attention_fwd.cpp,
// flash_attention_decode.cpp, flash_attention_bwd.cpp; headers in flash_attention/: common.h (constants),
// mask.h (masks, segment tables), layout.h (operand layouts), tiles.h (fp32 micro-GEMMs, 2^x, row kernels),
// tiles_bf16.h (vdpbf16ps tiles), flash_attention.h (what the sources call across files).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/flash_attention/flash_attention.h"

namespace fmk::cpu::flash_attn {
namespace {

// ================================================================ checks

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (B, H, N, D), got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": q must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k must have q's batch and head dim, got q ",
              q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": q's heads (", q.size(1),
              ") must be a multiple of k's heads (", k.size(1), ")");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": head dim must be in [1, ", kMaxHeadDim,
              "], got ", q.size(3));
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, int64_t window_left,
                                                          int64_t window_right) {
  const char* op = "fmkernels::flash_attention_fwd";
  check_qkv(q, k, v, op);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};
  if (Nk == 0) {
    out.zero_();
    lse.fill_(kNegInf);
    return {out, lse};
  }
  if (use_decode_path(q)) {
    flash_attention_fwd_decode(q, k, v, scale, window_left, window_right, out, lse);
    return {out, lse};
  }
  fwd_segments(q, k, v, dense_segments(B, Nq, Nk, window_left, window_right), Nq, round_up(Nk, BK), true, scale,
               out, lse);
  return {out, lse};
}

// ================================================================ varlen and key ranges

// q (Tq, Hq, D), k/v (Tk, Hkv, D) -> (1, H, T, D) views after the dense checks.
void check_varlen_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}})
    TORCH_CHECK(t->dim() == 3, op, ": ", name, " must be 3-D (total, H, D), got shape ", t->sizes());
  check_qkv(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), op);
}
at::Tensor as_bhnd(const at::Tensor& x) { return x.transpose(0, 1).unsqueeze(0); }

void check_max_seqlen(const std::vector<Seg>& segs, int64_t max_q, int64_t max_k, const char* op) {
  for (const Seg& s : segs)
    TORCH_CHECK(s.nq <= max_q && s.nk <= max_k, op, ": max_seqlen_q / max_seqlen_k (", max_q, ", ", max_k,
                ") are smaller than a sequence (", s.nq, " queries, ", s.nk, " keys)");
}

std::tuple<at::Tensor, at::Tensor> flash_attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right) {
  const char* op = "fmkernels::flash_attention_varlen_fwd";
  check_varlen_qkv(q, k, v, op);
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2);
  int64_t NQP, NKP;
  std::vector<Seg> segs = varlen_segments(cu_seqlens_q, cu_seqlens_k, Tq, k.size(0), window_left, window_right,
                                          &NQP, &NKP, op);
  check_max_seqlen(segs, max_seqlen_q, max_seqlen_k, op);
  at::Tensor out = at::empty({Tq, Hq, D}, q.options());
  at::Tensor lse = at::empty({Hq, Tq}, q.options().dtype(at::kFloat));
  if (Tq == 0 || Hq == 0) return {out, lse};
  at::Tensor outv = as_bhnd(out), lsev = lse.unsqueeze(0);
  fwd_segments(as_bhnd(q), as_bhnd(k), as_bhnd(v), std::move(segs), NQP, NKP, false, scale, outv, lsev);
  return {out, lse};
}

// key_start / key_end (B,) int32: batch entry b attends to keys [key_start[b], key_end[b]) only (a padded batch;
// masks keep their positions in the padded sequence).
std::vector<Seg> range_segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& key_start,
                                const at::Tensor& key_end, int64_t left, int64_t right, const char* op,
                                at::Tensor& ks, at::Tensor& ke) {
  const int64_t B = q.size(0), Nk = k.size(2);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"key_start", &key_start}, {"key_end", &key_end}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->device().is_cpu() && t->dim() == 1 && t->size(0) == B, op, ": ",
                name, " must be a CPU int32 tensor of shape (", B, ",), got ", t->scalar_type(), " ", t->sizes());
  }
  ks = key_start.contiguous();
  ke = key_end.contiguous();
  const int32_t* s = ks.const_data_ptr<int32_t>();
  const int32_t* e = ke.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= s[b] && s[b] <= e[b] && e[b] <= Nk, op, ": need 0 <= key_start <= key_end <= ", Nk,
                " (the keys), got ", s[b], " and ", e[b], " at batch entry ", b);
  return dense_segments(B, q.size(2), Nk, left, right, s, e);
}

std::tuple<at::Tensor, at::Tensor> flash_attention_range_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& key_start,
                                                                const at::Tensor& key_end, double scale,
                                                                int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_range_fwd";
  check_qkv(q, k, v, op);
  at::Tensor ks, ke;
  std::vector<Seg> segs = range_segments(q, k, key_start, key_end, window_left, window_right, op, ks, ke);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};
  fwd_segments(q, k, v, std::move(segs), Nq, std::max<int64_t>(round_up(Nk, BK), BK), true, scale, out, lse);
  return {out, lse};
}

void check_bwd_shapes(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                      const char* op) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              op, ": lse must have shape (B, Hq, Nq), got ", lse.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_bwd";
  check_qkv(q, k, v, op);
  check_bwd_shapes(grad_out, q, out, lse, op);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  at::Tensor dq = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, Nk, D}, k.options());  // every row is written
  at::Tensor dv = at::empty({B, Hkv, Nk, D}, v.options());
  if (B == 0 || Hq == 0 || Nq == 0 || Nk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  bwd_segments(grad_out, q, k, v, out, lse, dense_segments(B, Nq, Nk, window_left, window_right), round_up(Nq, BQ),
               round_up(Nk, BK), true, scale, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_varlen_bwd";
  check_varlen_qkv(q, k, v, op);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), op,
              ": lse must have shape (Hq, total_q), got ", lse.sizes());
  const int64_t Tq = q.size(0), Tk = k.size(0);
  int64_t NQP, NKP;
  std::vector<Seg> segs = varlen_segments(cu_seqlens_q, cu_seqlens_k, Tq, Tk, window_left, window_right, &NQP, &NKP,
                                          op);
  check_max_seqlen(segs, max_seqlen_q, max_seqlen_k, op);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);  // every row is written
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (Tq == 0 || Tk == 0 || q.size(1) == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor dqv = as_bhnd(dq), dkv = as_bhnd(dk), dvv = as_bhnd(dv);
  bwd_segments(as_bhnd(grad_out), as_bhnd(q), as_bhnd(k), as_bhnd(v), as_bhnd(out), lse.unsqueeze(0), std::move(segs),
               NQP, NKP, false, scale, dqv, dkv, dvv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_range_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& key_start, const at::Tensor& key_end, double scale, int64_t window_left,
    int64_t window_right) {
  const char* op = "fmkernels::flash_attention_range_bwd";
  check_qkv(q, k, v, op);
  check_bwd_shapes(grad_out, q, out, lse, op);
  at::Tensor ks, ke;
  std::vector<Seg> segs = range_segments(q, k, key_start, key_end, window_left, window_right, op, ks, ke);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  at::Tensor dq = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, Nk, D}, k.options());
  at::Tensor dv = at::empty({B, Hkv, Nk, D}, v.options());
  if (B == 0 || Hq == 0 || Nq == 0 || Nk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  bwd_segments(grad_out, q, k, v, out, lse, std::move(segs), round_up(Nq, BQ), round_up(Nk, BK), true, scale, dq, dk,
               dv);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fmk::cpu::flash_attn

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) {
  m.impl("flash_attention_fwd", &fmk::cpu::flash_attn::flash_attention_fwd_cpu);
  m.impl("flash_attention_bwd", &fmk::cpu::flash_attn::flash_attention_bwd_cpu);
  m.impl("flash_attention_varlen_fwd", &fmk::cpu::flash_attn::flash_attention_varlen_fwd_cpu);
  m.impl("flash_attention_varlen_bwd", &fmk::cpu::flash_attn::flash_attention_varlen_bwd_cpu);
  m.impl("flash_attention_range_fwd", &fmk::cpu::flash_attn::flash_attention_range_fwd_cpu);
  m.impl("flash_attention_range_bwd", &fmk::cpu::flash_attn::flash_attention_range_bwd_cpu);
}
