// What the CPU flash attention sources call across files: the tiled forward and backward over segments and the
// decoding forward. The op entry points and their argument checks are in csrc/cpu/flash_attention.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu/flash_attention/mask.h"

namespace fmk::cpu::flash_attn {

// The tiled forward over segments. qv (B, Hq, NQ, D) and kv, vv (B, Hkv, NK, D): views, any strides; outv
// (B, Hq, NQ, D) writable with a unit d stride; lse (B, Hq, NQ) contiguous fp32. dense: each segment's keys
// are its batch entry's rows [0, NK) (padded in one piece), else they are repacked per segment at k0.
void fwd_segments(const at::Tensor& qv, const at::Tensor& kv, const at::Tensor& vv, std::vector<Seg> segs,
                  int64_t NQP, int64_t NKP, bool dense, double scale, at::Tensor& outv, at::Tensor& lse);

// The tiled backward over segments (views as in fwd_segments); writes dqv (B, Hq, NQ, D), dkv, dvv
// (B, Hkv, NK, D) (unit d stride). NQP: padded query rows for the bf16 path (each segment at qp0).
void bwd_segments(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, std::vector<Seg> segs, int64_t NQP, int64_t NKP,
                  bool dense, double scale, at::Tensor& dqv, at::Tensor& dkv, at::Tensor& dvv);

// Decoding forward (flash_attention_decode.cpp), for Nq <= kDecodeMaxNq: the tiled path re-lays out all of K/V per call, which a handful of query rows cannot
// amortize (fp32 Nq=1 Nk=4096 B4 H8 D64: 18.7 ms vs SDPA 2.4 ms). Here K and V are read in place (any row
// stride, contiguous head dim, any float dtype) exactly once per (batch, kv head): the R = (Hq/Hkv) * Nq query
// rows of a GQA group share each key. Split-K: each (batch, kv head) is cut into key chunks (a function of the
// shape only), each task keeps an unnormalized (O, m, l) per row, and the chunks are merged afterwards in a fixed
// order with a log-sum-exp rescale (deterministic). Scores: per key, D/16 FMAs per row and one horizontal sum.
constexpr int64_t kDecodeMaxNq = 16;

bool use_decode_path(const at::Tensor& q);
void flash_attention_fwd_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                int64_t window_left, int64_t window_right, at::Tensor& out, at::Tensor& lse);

}  // namespace fmk::cpu::flash_attn
