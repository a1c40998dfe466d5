// Cross-entropy chunk, CUDA launcher (raw pointers; no ATen). Schema and semantics:
// fmkernels/ops/cross_entropy.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// logits (C, V) contiguous, overwritten with scale * (softmax - onehot); loss (C,) fp32; target int64.
cudaError_t ce_chunk(DType dtype, void* logits, const int64_t* target, float* loss, int64_t C, int64_t V, float scale,
                     int64_t ignore_index, cudaStream_t stream);

}  // namespace fmk::cuda
