// Block-sparse (BSR) matmul CUDA launcher (raw pointers; no ATen). Format: fmkernels/reference/sparse.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// y (M, N) = x (M, K) @ W^T (+ bias), W block-sparse: blocks (nnzb, b, b), row_ptr (N/b + 1), col_idx (nnzb).
cudaError_t bsr_mm(DType dtype, const void* x, const void* blocks, const int32_t* row_ptr, const int32_t* col_idx,
                   const float* bias, void* y, int64_t M, int64_t N, int64_t K, int b, cudaStream_t stream);

}  // namespace fmk::cuda
