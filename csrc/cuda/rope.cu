// RoPE on CUDA (sm80+): q and k rotated in one launch, one block per (b, n) row; fp32 arithmetic, loads/stores
// in the tensor dtype. Schema and semantics: fmkernels/ops/rope.py.
#include "cuda/common.cuh"
#include "cuda/rope.h"

namespace fmk::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ void rope_heads(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ c,
                                           const float* __restrict__ s, int64_t H, int64_t sh, int64_t half,
                                           float sign) {
  for (int64_t i = threadIdx.x; i < H * half; i += blockDim.x) {
    const int64_t h = i / half, j = i % half;
    const T* xr = x + h * sh;
    const float x1 = to_float(xr[j]), x2 = to_float(xr[half + j]);
    const float cv = c[j], sv = sign * s[j];
    T* yr = y + h * 2 * half;
    yr[j] = from_float<T>(x1 * cv - x2 * sv);
    yr[half + j] = from_float<T>(x2 * cv + x1 * sv);
  }
}

template <typename T>
__global__ void rope_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ qo, T* __restrict__ ko,
                            const float* __restrict__ cos, const float* __restrict__ sin, int64_t N, int64_t Hq,
                            int64_t Hk, int64_t half, int64_t sq0, int64_t sq1, int64_t sq2, int64_t sk0, int64_t sk1,
                            int64_t sk2, float sign) {
  const int64_t row = blockIdx.x, b = row / N, n = row % N;
  const float* c = cos + n * half;
  const float* s = sin + n * half;
  rope_heads(q + b * sq0 + n * sq1, qo + row * Hq * 2 * half, c, s, Hq, sq2, half, sign);
  rope_heads(k + b * sk0 + n * sk1, ko + row * Hk * 2 * half, c, s, Hk, sk2, half, sign);
}

}  // namespace

cudaError_t rope(DType dtype, const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin,
                 int64_t B, int64_t N, int64_t Hq, int64_t Hk, int64_t D, int64_t sq0, int64_t sq1, int64_t sq2,
                 int64_t sk0, int64_t sk1, int64_t sk2, float sign, cudaStream_t stream) {
  if (B * N == 0 || D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<static_cast<unsigned>(B * N), kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<T*>(qo), static_cast<T*>(ko), cos, sin, N, Hq,
        Hk, D / 2, sq0, sq1, sq2, sk0, sk1, sk2, sign);
    return cudaGetLastError();
  });
}

}  // namespace fmk::cuda
