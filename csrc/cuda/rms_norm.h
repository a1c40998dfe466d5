// RMSNorm CUDA launchers (raw pointers; no ATen). Rows are contiguous, row length H.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// y = x * rstd * w (w may be null); rstd[rows] fp32.
cudaError_t rms_norm_fwd(DType dtype, const void* x, const float* w, void* y, float* rstd, int64_t rows, int64_t H,
                         float eps, cudaStream_t stream);

// dx = rstd * (dy*w) - x * rstd^3 * sum(dy*w*x)/H ; dw_partial[nblocks, H] fp32 partial sums of dy * x * rstd
// (summed by the caller in fixed order: deterministic). dw_partial may be null.
cudaError_t rms_norm_bwd(DType dtype, const void* dy, const void* x, const float* w, const float* rstd, void* dx,
                         float* dw_partial, int64_t rows, int64_t H, int64_t rows_per_block, cudaStream_t stream);

}  // namespace fmk::cuda
