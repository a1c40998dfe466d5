// Quantized GEMM CUDA launchers (raw pointers + stream; no ATen). Formats: fmkernels/reference/quant.py.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

// Output kinds of the int8 GEMM: the three float dtypes, or raw int32.
enum class OutKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt32 = 3 };

// q[M, K] int8, scale[M] = amax / 127 of each row of x (fp32/bf16/fp16, row stride K); round half to even.
cudaError_t quantize_rows(DType dtype, const void* x, int8_t* q, float* scale, int64_t M, int64_t K,
                          cudaStream_t stream);

// C[M, N] = (A[M, K] @ B[N, K]^T) * a_scale[m] * b_scale[n] (+ bias[n]); B in the packed vnni16x4 layout
// (Bp words: ((n / 16) * KQ + k / 4) * 16 + n % 16, KQ = Kp / 4); int32 output ignores scales and bias.
cudaError_t int8_mm(const int8_t* A, const int8_t* Bp, const float* a_scale, const float* b_scale, const float* bias,
                    void* C, OutKind out, int64_t M, int64_t N, int64_t K, int64_t KQ, cudaStream_t stream);

// C[M, N] = x[M, K] @ dequant(W)^T (+ bias), W int4 in the int4x8 layout, scale/zero (K/G, NP) fp32.
cudaError_t int4_mm(DType dtype, const void* x, const uint8_t* Wp, const float* scale, const float* zero,
                    const float* bias, void* C, int64_t M, int64_t N, int64_t K, int64_t NP, int64_t G,
                    cudaStream_t stream);

// C[M, N] = x[M, K] @ dequant(W)^T (+ bias), W int8 in the wo8 layout (bytes = q + 128), scale (K/G, NP) fp32.
cudaError_t int8_weight_only_mm(DType dtype, const void* x, const uint8_t* Wp, const float* scale, const float* bias,
                                void* C, int64_t M, int64_t N, int64_t K, int64_t NP, int64_t G, cudaStream_t stream);

// C[M, N] = (a[M, K] @ b[N, K]^T) * a_scale * b_scale (+ bias); a, b float8 e4m3 bytes; scales per row
// (stride 1) or per tensor (stride 0).
cudaError_t fp8_mm(const uint8_t* a, const uint8_t* b, const float* a_scale, int64_t a_scale_stride,
                   const float* b_scale, int64_t b_scale_stride, const float* bias, DType out, void* C, int64_t M,
                   int64_t N, int64_t K, cudaStream_t stream);

}  // namespace fmk::cuda
