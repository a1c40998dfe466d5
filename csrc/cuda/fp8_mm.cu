// fp8 (e4m3) GEMM on CUDA with per-row or per-tensor scales and fp32 accumulation. e4m3 -> fp32 conversion goes
// through cuda_fp8.h, which uses the hardware cvt on sm_89+ and a software path below, so this file compiles
// (and runs, slowly) for sm_80 too; tensor-core fp8 (wgmma / mma e4m3, sm_89+/sm_90a) is not implemented here.
#include <cuda_fp8.h>

#include "cuda/common.cuh"
#include "cuda/quant.h"

namespace fmk::cuda {
namespace {

constexpr int kT = 16;

__device__ __forceinline__ float fp8_to_float(uint8_t v) {
  __nv_fp8_e4m3 f;
  f.__x = v;
  return static_cast<float>(f);
}

template <typename OutT>
__global__ void fp8_mm_kernel(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b,
                              const float* __restrict__ a_scale, int64_t sa, const float* __restrict__ b_scale,
                              int64_t sb, const float* __restrict__ bias, OutT* __restrict__ C, int64_t M, int64_t N,
                              int64_t K) {
  __shared__ float As[kT][kT + 1], Bs[kT][kT + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.y) * kT + ty, n = static_cast<int64_t>(blockIdx.x) * kT + tx;
  const int64_t nl = static_cast<int64_t>(blockIdx.x) * kT + ty;  // B row loaded by this thread
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kT) {
    As[ty][tx] = (m < M && k0 + tx < K) ? fp8_to_float(a[m * K + k0 + tx]) : 0.f;
    Bs[ty][tx] = (nl < N && k0 + tx < K) ? fp8_to_float(b[nl * K + k0 + tx]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kT; ++k) acc = fmaf(As[ty][k], Bs[tx][k], acc);
    __syncthreads();
  }
  if (m < M && n < N)
    C[m * N + n] = from_float<OutT>(acc * a_scale[m * sa] * b_scale[n * sb] + (bias ? bias[n] : 0.f));
}

}  // namespace

cudaError_t fp8_mm(const uint8_t* a, const uint8_t* b, const float* a_scale, int64_t a_scale_stride,
                   const float* b_scale, int64_t b_scale_stride, const float* bias, DType out, void* C, int64_t M,
                   int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid((N + kT - 1) / kT, (M + kT - 1) / kT), block(kT, kT);
  switch (out) {
    case DType::kFloat32:
      fp8_mm_kernel<float><<<grid, block, 0, stream>>>(a, b, a_scale, a_scale_stride, b_scale, b_scale_stride, bias,
                                                       static_cast<float*>(C), M, N, K);
      break;
    case DType::kBFloat16:
      fp8_mm_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(a, b, a_scale, a_scale_stride, b_scale, b_scale_stride,
                                                               bias, static_cast<__nv_bfloat16*>(C), M, N, K);
      break;
    case DType::kFloat16:
      fp8_mm_kernel<__half><<<grid, block, 0, stream>>>(a, b, a_scale, a_scale_stride, b_scale, b_scale_stride, bias,
                                                        static_cast<__half*>(C), M, N, K);
      break;
  }
  return cudaGetLastError();
}

}  // namespace fmk::cuda
