// Fused training ops on CUDA (sm80+): RoPE (q and k in one launch), SwiGLU fwd/bwd, cross-entropy chunk.
// One block per row; fp32 arithmetic; loads/stores in the tensor dtype. Deterministic (no atomics).
#include <cfloat>

#include "cuda/common.cuh"
#include "cuda/fused_train.h"

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

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < nwarps) ? partial[threadIdx.x] : -FLT_MAX;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  if (threadIdx.x == 0) partial[0] = v;
  __syncthreads();
  return partial[0];
}

template <typename T>
__global__ void ce_chunk_kernel(T* __restrict__ z, const int64_t* __restrict__ target, float* __restrict__ loss,
                                int64_t V, float scale, int64_t ignore_index) {
  const int64_t r = blockIdx.x;
  T* zr = z + r * V;
  const int64_t t = target[r];
  if (t == ignore_index) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) zr[j] = from_float<T>(0.f);
    if (threadIdx.x == 0) loss[r] = 0.f;
    return;
  }
  float m = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, to_float(zr[j]));
  m = block_max(m);
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) acc += __expf(to_float(zr[j]) - m);
  const float lse = m + logf(block_sum(acc));
  const float zt = to_float(zr[t]);
  __syncthreads();  // every thread has read zr[t] before it is overwritten
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float gr = __expf(to_float(zr[j]) - lse) * scale;
    if (j == t) gr -= scale;
    zr[j] = from_float<T>(gr);
  }
  if (threadIdx.x == 0) loss[r] = lse - zt;
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rope(DType dtype, const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin,
                 int64_t B, int64_t N, int64_t Hq, int64_t Hk, int64_t D, int64_t sq0, int64_t sq1, int64_t sq2,
                 int64_t sk0, int64_t sk1, int64_t sk2, float sign, cudaStream_t stream) {
  if (B * N == 0 || D == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<static_cast<unsigned>(B * N), kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<T*>(qo), static_cast<T*>(ko), cos, sin, N, Hq,
        Hk, D / 2, sq0, sq1, sq2, sk0, sk1, sk2, sign);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_fwd(DType dtype, const void* a, const void* b, void* y, int64_t rows, int64_t F, int64_t sa,
                       int64_t sb, cudaStream_t stream) {
  if (rows == 0 || F == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(y), F, sa, sb);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_bwd(DType dtype, const void* g, const void* a, const void* b, void* out, int64_t rows, int64_t F,
                       int64_t sg, int64_t sa, int64_t sb, cudaStream_t stream) {
  if (rows == 0 || F == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_bwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), F, sg, sa,
        sb);
    return cudaGetLastError();
  });
}

cudaError_t ce_chunk(DType dtype, void* logits, const int64_t* target, float* loss, int64_t C, int64_t V, float scale,
                     int64_t ignore_index, cudaStream_t stream) {
  if (C == 0 || V == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    ce_chunk_kernel<T><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(static_cast<T*>(logits), target, loss, V,
                                                                         scale, ignore_index);
    return cudaGetLastError();
  });
}

}  // namespace fmk::cuda
