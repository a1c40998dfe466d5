// Fused training ops, CUDA launchers (raw pointers; no ATen): RoPE on q and k, SwiGLU fwd/bwd, cross-entropy
// chunk (loss + in-place gradient). Schemas and semantics: fmkernels/ops/{rope,swiglu,cross_entropy}.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// q: (B, N, Hq, D) with strides (sq0, sq1, sq2, 1); k likewise; outputs contiguous (B, N, H, D).
// cos/sin: (>= N, D/2) fp32 contiguous. sign = -1 rotates by -theta (the backward).
cudaError_t rope(DType dtype, const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin,
                 int64_t B, int64_t N, int64_t Hq, int64_t Hk, int64_t D, int64_t sq0, int64_t sq1, int64_t sq2,
                 int64_t sk0, int64_t sk1, int64_t sk2, float sign, cudaStream_t stream);

// y[r, :F] = silu(a[r]) * b[r]; a/b rows at a + r*sa, b + r*sb; y contiguous (rows, F).
cudaError_t swiglu_fwd(DType dtype, const void* a, const void* b, void* y, int64_t rows, int64_t F, int64_t sa,
                       int64_t sb, cudaStream_t stream);

// out (rows, 2F) contiguous = [da | db]; g/a/b rows with strides sg, sa, sb.
cudaError_t swiglu_bwd(DType dtype, const void* g, const void* a, const void* b, void* out, int64_t rows, int64_t F,
                       int64_t sg, int64_t sa, int64_t sb, cudaStream_t stream);

// logits (C, V) contiguous, overwritten with scale * (softmax - onehot); loss (C,) fp32; target int64.
cudaError_t ce_chunk(DType dtype, void* logits, const int64_t* target, float* loss, int64_t C, int64_t V, float scale,
                     int64_t ignore_index, cudaStream_t stream);

}  // namespace fmk::cuda
