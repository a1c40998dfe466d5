// int8 weight-only GEMM (W8A16) on CUDA: weight bytes of the "wo8" layout dequantized in registers,
// (u - 128) * scale[g, n], fp32 accumulation. One thread per output column and kRows rows: each 32-bit word of the
// layout holds 4 k-values of one column, so a warp reads 32 consecutive columns' words (coalesced within a
// 16-column block). Aimed at small M (decode); large M should dequantize tiles into shared memory for tensor cores.
#include "cuda/common.cuh"
#include "cuda/quant.h"

namespace fmk::cuda {
namespace {

constexpr int kRows = 8;

template <typename T>
__global__ void __launch_bounds__(128) int8_wo_mm_kernel(const T* __restrict__ x, const uint32_t* __restrict__ Ww,
                                                         const float* __restrict__ scale,
                                                         const float* __restrict__ bias, T* __restrict__ C, int64_t M,
                                                         int64_t N, int64_t K, int64_t NP, int64_t G) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= N) return;
  const int64_t KQ = K / 4;
  float acc[kRows] = {};
  for (int64_t t = 0; t < KQ; ++t) {
    const uint32_t w = Ww[((n / 16) * KQ + t) * 16 + n % 16];  // 4 bytes: k = 4t + j
    const float s = scale[((4 * t) / G) * NP + n];
    float wv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wv[j] = (static_cast<float>((w >> (8 * j)) & 0xFFu) - 128.f) * s;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t m = m0 + i;
      if (m < M) {
        const T* xr = x + m * K + 4 * t;
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i] = fmaf(to_float<T>(xr[j]), wv[j], acc[i]);
      }
    }
  }
  const float b = bias ? bias[n] : 0.f;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
    if (m0 + i < M) C[(m0 + i) * N + n] = from_float<T>(acc[i] + b);
}

template <typename T>
void launch(const void* x, const uint8_t* Wp, const float* scale, const float* bias, void* C, int64_t M, int64_t N,
            int64_t K, int64_t NP, int64_t G, cudaStream_t stream) {
  const dim3 grid((N + 127) / 128, (M + kRows - 1) / kRows);
  int8_wo_mm_kernel<T><<<grid, 128, 0, stream>>>(static_cast<const T*>(x), reinterpret_cast<const uint32_t*>(Wp),
                                                 scale, bias, static_cast<T*>(C), M, N, K, NP, G);
}

}  // namespace

cudaError_t int8_weight_only_mm(DType dtype, const void* x, const uint8_t* Wp, const float* scale, const float* bias,
                                void* C, int64_t M, int64_t N, int64_t K, int64_t NP, int64_t G, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: launch<float>(x, Wp, scale, bias, C, M, N, K, NP, G, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(x, Wp, scale, bias, C, M, N, K, NP, G, stream); break;
    case DType::kFloat16: launch<__half>(x, Wp, scale, bias, C, M, N, K, NP, G, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace fmk::cuda
