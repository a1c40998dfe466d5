// 2:4 sparse and block-sparse matmul CUDA launchers (raw pointers; no ATen). Formats: fmkernels/reference/sparse.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// y (M, N) = x (M, K) @ W^T (+ bias), W 2:4: values (N, K/2), meta int32 (N, K/32). bf16/fp16 through mma.sp
// (sparse tensor cores, sm80+); K must be a multiple of 32. bias fp32 (N,) or null.
cudaError_t sparse24_mm(DType dtype, const void* x, const void* values, const int32_t* meta, const float* bias, void* y,
                        int64_t M, int64_t N, int64_t K, cudaStream_t stream);

// y (M, N) = x (M, K) @ W^T (+ bias), W block-sparse: blocks (nnzb, b, b), row_ptr (N/b + 1), col_idx (nnzb).
cudaError_t bsr_mm(DType dtype, const void* x, const void* blocks, const int32_t* row_ptr, const int32_t* col_idx,
                   const float* bias, void* y, int64_t M, int64_t N, int64_t K, int b, cudaStream_t stream);

}  // namespace fmk::cuda
