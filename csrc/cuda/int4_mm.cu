// int4 weight-only GEMM (W4A16) on CUDA: nibbles dequantized in registers ((q - zero) * scale per group), fp32
// accumulation. One thread per output column and kRows rows: each packed 32-bit word of the int4x8 layout holds
// 8 k-values of one column, so a warp reads 32 consecutive columns' words (coalesced within a 16-column block).
// Aimed at small M (decode); large M should dequantize tiles into shared memory for tensor cores (not done).
#include "cuda/common.cuh"
#include "cuda/quant.h"

namespace fmk::cuda {
namespace {

constexpr int kRows = 8;

template <typename T>
__global__ void __launch_bounds__(128) int4_mm_kernel(const T* __restrict__ x, const uint32_t* __restrict__ Ww,
                                                      const float* __restrict__ scale, const float* __restrict__ zero,
                                                      const float* __restrict__ bias, T* __restrict__ C, int64_t M,
                                                      int64_t N, int64_t K, int64_t NP, int64_t G) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= N) return;
  const int64_t KT = K / 8;
  float acc[kRows] = {};
  for (int64_t t = 0; t < KT; ++t) {
    const uint32_t w = Ww[((n / 16) * KT + t) * 16 + n % 16];  // 4 bytes: k = 8t + j (lo), 8t + 4 + j (hi)
    const int64_t g = (8 * t) / G;
    const float s = scale[g * NP + n], z = zero[g * NP + n];
    float wv[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t byte = (w >> (8 * j)) & 0xFFu;
      wv[j] = (static_cast<float>(byte & 0xFu) - z) * s;
      wv[4 + j] = (static_cast<float>(byte >> 4) - z) * s;
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t m = m0 + i;
      if (m < M) {
        const T* xr = x + m * K + 8 * t;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i] = fmaf(to_float<T>(xr[j]), wv[j], acc[i]);
      }
    }
  }
  const float b = bias ? bias[n] : 0.f;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
    if (m0 + i < M) C[(m0 + i) * N + n] = from_float<T>(acc[i] + b);
}

template <typename T>
void launch(const void* x, const uint8_t* Wp, const float* scale, const float* zero, const float* bias, void* C,
            int64_t M, int64_t N, int64_t K, int64_t NP, int64_t G, cudaStream_t stream) {
  const dim3 grid((N + 127) / 128, (M + kRows - 1) / kRows);
  int4_mm_kernel<T><<<grid, 128, 0, stream>>>(static_cast<const T*>(x), reinterpret_cast<const uint32_t*>(Wp), scale,
                                              zero, bias, static_cast<T*>(C), M, N, K, NP, G);
}

}  // namespace

cudaError_t int4_mm(DType dtype, const void* x, const uint8_t* Wp, const float* scale, const float* zero,
                    const float* bias, void* C, int64_t M, int64_t N, int64_t K, int64_t NP, int64_t G,
                    cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: launch<float>(x, Wp, scale, zero, bias, C, M, N, K, NP, G, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(x, Wp, scale, zero, bias, C, M, N, K, NP, G, stream); break;
    case DType::kFloat16: launch<__half>(x, Wp, scale, zero, bias, C, M, N, K, NP, G, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace fmk::cuda
