// Constants and small helpers every CPU flash attention file shares (see csrc/cpu/flash_attention.cpp for the
// algorithm). Everything here is constexpr or inline: each translation unit compiles its own copy.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/vec.h"

namespace fmk::cpu::flash_attn {

// Largest head dim the CPU kernels take (q.size(-1)); fmkernels/ops/attention.py's MAX_HEAD_DIM must match.
constexpr int64_t kMaxHeadDim = 256;

constexpr int64_t BQ = 64;  // query rows per tile
constexpr int64_t BK = 64;  // keys per tile (multiple of 32)
static_assert(BQ == BK, "the bf16 backward packs Q^T panels with the K^T blocking");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kRescale = 8.0f;  // lazy online-softmax rescale threshold (log2 units)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Tasks are handed out from a shared counter (one at::parallel_for index per thread) rather than split
// statically: on a shared machine a descheduled thread no longer holds back half of the work. Each task writes
// only its own outputs, so results do not depend on which thread ran it (bit-identical run to run).
inline int64_t workers(int64_t ntask) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask)); }

using bf16 = c10::BFloat16;

inline bool use_bf16_path(const at::Tensor& q) { return q.scalar_type() == at::kBFloat16 && use_avx512_bf16(); }

}  // namespace fmk::cpu::flash_attn
