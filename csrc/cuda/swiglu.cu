// SwiGLU forward/backward on CUDA (sm80+): one block per row; fp32 arithmetic, loads/stores in the tensor
// dtype. Schema and semantics: fmkernels/ops/swiglu.py.
#include "cuda/common.cuh"
#include "cuda/swiglu.h"

namespace fmk::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t F,
                                  int64_t sa, int64_t sb) {
  const int64_t r = blockIdx.x;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
    const float av = to_float(a[r * sa + j]);
    y[r * F + j] = from_float<T>(av * sigmoidf(av) * to_float(b[r * sb + j]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ a, const T* __restrict__ b,
                                  T* __restrict__ out, int64_t F, int64_t sg, int64_t sa, int64_t sb) {
  const int64_t r = blockIdx.x;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
    const float gv = to_float(g[r * sg + j]), av = to_float(a[r * sa + j]), bv = to_float(b[r * sb + j]);
    const float s = sigmoidf(av), silu = av * s;
    out[r * 2 * F + j] = from_float<T>(gv * bv * (s + silu - silu * s));
    out[r * 2 * F + F + j] = from_float<T>(gv * silu);
  }
}

}  // namespace

cudaError_t swiglu_fwd(DType dtype, const void* a, const void* b, void* y, int64_t rows, int64_t F, int64_t sa,
                       int64_t sb, cudaStream_t stream) {
  if (rows == 0 || F == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(y), F, sa, sb);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_bwd(DType dtype, const void* g, const void* a, const void* b, void* out, int64_t rows, int64_t F,
                       int64_t sg, int64_t sa, int64_t sb, cudaStream_t stream) {
  if (rows == 0 || F == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_bwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), F, sg, sa,
        sb);
    return cudaGetLastError();
  });
}

}  // namespace fmk::cuda
