// SwiGLU forward/backward, CUDA launchers (raw pointers; no ATen). Schema and semantics: fmkernels/ops/swiglu.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// y[r, :F] = silu(a[r]) * b[r]; a/b rows at a + r*sa, b + r*sb; y contiguous (rows, F).
cudaError_t swiglu_fwd(DType dtype, const void* a, const void* b, void* y, int64_t rows, int64_t F, int64_t sa,
                       int64_t sb, cudaStream_t stream);

// out (rows, 2F) contiguous = [da | db]; g/a/b rows with strides sg, sa, sb.
cudaError_t swiglu_bwd(DType dtype, const void* g, const void* a, const void* b, void* out, int64_t rows, int64_t F,
                       int64_t sg, int64_t sa, int64_t sb, cudaStream_t stream);

}  // namespace fmk::cuda
