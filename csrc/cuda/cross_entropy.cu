// Cross-entropy chunk on CUDA (sm80+): loss and the in-place logits gradient, one block per row; fp32
// arithmetic; deterministic (no atomics). Schema and semantics: fmkernels/ops/cross_entropy.py.
#include <cfloat>

#include "cuda/common.cuh"
#include "cuda/cross_entropy.h"

namespace fmk::cuda {
namespace {

constexpr int kThreads = 256;

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

}  // namespace

cudaError_t ce_chunk(DType dtype, void* logits, const int64_t* target, float* loss, int64_t C, int64_t V, float scale,
                     int64_t ignore_index, cudaStream_t stream) {
  if (C == 0 || V == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    ce_chunk_kernel<T><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(static_cast<T*>(logits), target, loss, V,
                                                                         scale, ignore_index);
    return cudaGetLastError();
  });
}

}  // namespace fmk::cuda
