// 2:4 sparse matmul CUDA launcher (raw pointers; no ATen). Format: fmkernels/reference/sparse.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// y (M, N) = x (M, K) @ W^T (+ bias), W 2:4: values (N, K/2), meta int32 (N, K/32). bf16/fp16 through mma.sp
// (sparse tensor cores, sm80+); K must be a multiple of 32. bias fp32 (N,) or null.
cudaError_t sparse24_mm(DType dtype, const void* x, const void* values, const int32_t* meta, const float* bias, void* y,
                        int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace fmk::cuda
