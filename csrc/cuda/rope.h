// RoPE, CUDA launcher (raw pointers; no ATen). Schema and semantics: fmkernels/ops/rope.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// q: (B, N, Hq, D) with strides (sq0, sq1, sq2, 1); k likewise; outputs contiguous (B, N, H, D).
// cos/sin: (>= N, D/2) fp32 contiguous. sign = -1 rotates by -theta (the backward).
cudaError_t rope(DType dtype, const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin,
                 int64_t B, int64_t N, int64_t Hq, int64_t Hk, int64_t D, int64_t sq0, int64_t sq1, int64_t sq2,
                 int64_t sk0, int64_t sk1, int64_t sk2, float sign, cudaStream_t stream);

}  // namespace fmk::cuda
