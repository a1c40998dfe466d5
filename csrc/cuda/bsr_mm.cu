// Block-sparse (BSR) matmul, CUDA: y = x @ W^T with W as square b x b blocks (b = 16/32/64) per block row.
// One thread block per (64 rows of x, block row r): for each kept block of row r only, the (64, b) slice of x and
// the (b, b) block go to shared memory and 256 threads accumulate a (64, b) fp32 tile. Compile-checked here;
// not yet run on a GPU.
#include "cuda/common.cuh"
#include "cuda/bsr_mm.h"

namespace fmk::cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kThreads = 256;

template <typename T, int B>
__global__ void __launch_bounds__(kThreads) bsr_kernel(const T* __restrict__ x, const T* __restrict__ blocks,
                                                      const int32_t* __restrict__ row_ptr,
                                                      const int32_t* __restrict__ col_idx,
                                                      const float* __restrict__ bias, T* __restrict__ y, int64_t M,
                                                      int64_t N, int64_t K) {
  __shared__ float xs[kTileM][B + 1];
  __shared__ float ws[B][B + 1];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int r = blockIdx.y;
  constexpr int kOut = kTileM * B / kThreads;  // outputs per thread
  float acc[kOut] = {};
  for (int i = row_ptr[r]; i < row_ptr[r + 1]; ++i) {
    const int64_t c = col_idx[i];
    for (int e = threadIdx.x; e < kTileM * B; e += kThreads) {
      const int mi = e / B, k = e % B;
      const int64_t m = m0 + mi;
      xs[mi][k] = m < M ? to_float(x[m * K + c * B + k]) : 0.f;
    }
    for (int e = threadIdx.x; e < B * B; e += kThreads) ws[e / B][e % B] = to_float(blocks[static_cast<int64_t>(i) * B * B + e]);
    __syncthreads();
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
      const int e = threadIdx.x + o * kThreads;
      const int mi = e / B, n = e % B;
      float s = 0.f;
#pragma unroll 8
      for (int k = 0; k < B; ++k) s += xs[mi][k] * ws[n][k];
      acc[o] += s;
    }
    __syncthreads();
  }
#pragma unroll
  for (int o = 0; o < kOut; ++o) {
    const int e = threadIdx.x + o * kThreads;
    const int mi = e / B, n = e % B;
    const int64_t m = m0 + mi, col = static_cast<int64_t>(r) * B + n;
    if (m < M) y[m * N + col] = from_float<T>(acc[o] + (bias ? bias[col] : 0.f));
  }
}

template <typename T, int B>
cudaError_t launch(const void* x, const void* blocks, const int32_t* rp, const int32_t* ci, const float* bias, void* y,
                   int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((M + kTileM - 1) / kTileM), static_cast<unsigned>(N / B));
  bsr_kernel<T, B><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(blocks), rp, ci, bias,
                                             static_cast<T*>(y), M, N, K);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_b(int b, const void* x, const void* blocks, const int32_t* rp, const int32_t* ci, const float* bias,
                     void* y, int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  switch (b) {
    case 16: return launch<T, 16>(x, blocks, rp, ci, bias, y, M, N, K, s);
    case 32: return launch<T, 32>(x, blocks, rp, ci, bias, y, M, N, K, s);
    case 64: return launch<T, 64>(x, blocks, rp, ci, bias, y, M, N, K, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t bsr_mm(DType dtype, const void* x, const void* blocks, const int32_t* row_ptr, const int32_t* col_idx,
                   const float* bias, void* y, int64_t M, int64_t N, int64_t K, int b, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_b<float>(b, x, blocks, row_ptr, col_idx, bias, y, M, N, K, stream);
    case DType::kBFloat16: return launch_b<__nv_bfloat16>(b, x, blocks, row_ptr, col_idx, bias, y, M, N, K, stream);
    case DType::kFloat16: return launch_b<__half>(b, x, blocks, row_ptr, col_idx, bias, y, M, N, K, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fmk::cuda
