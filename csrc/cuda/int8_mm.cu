// int8 GEMM with exact int32 accumulation (dp4a, sm_61+) on the shared packed weight layout, fused
// dequantizing epilogue; and dynamic per-row int8 quantization. Toolkit headers only.
//
// Tiling: 64 x 64 output tile per 256-thread block, 4 x 4 outputs per thread, K in chunks of 16 bytes staged
// through shared memory as int32 words (A: row-major, byte loads when K is not a multiple of 4; B: one aligned
// word per (n, k/4) in the packed layout). A correctness-first kernel: mma.sync (m16n8k32 s8) is the next step.
#include "cuda/common.cuh"
#include "cuda/quant.h"

namespace fmk::cuda {
namespace {

constexpr int kTile = 64, kKW = 4;  // 4 words = 16 bytes of K per step

__device__ __forceinline__ int32_t load_a_word(const int8_t* A, int64_t m, int64_t kw, int64_t M, int64_t K,
                                               bool aligned) {
  if (m >= M) return 0;
  const int64_t k = kw * 4;
  if (aligned && k + 3 < K) return *reinterpret_cast<const int32_t*>(A + m * K + k);
  uint32_t w = 0;
  for (int j = 0; j < 4; ++j)
    if (k + j < K) w |= static_cast<uint32_t>(static_cast<uint8_t>(A[m * K + k + j])) << (8 * j);
  return static_cast<int32_t>(w);
}

template <typename OutT>
__device__ __forceinline__ void store_out(OutT* C, int64_t idx, int32_t acc, float as, float bs, float b) {
  C[idx] = from_float<OutT>(static_cast<float>(acc) * as * bs + b);
}
template <>
__device__ __forceinline__ void store_out<int32_t>(int32_t* C, int64_t idx, int32_t acc, float, float, float) {
  C[idx] = acc;
}

template <typename OutT>
__global__ void __launch_bounds__(256) int8_mm_kernel(const int8_t* __restrict__ A, const int32_t* __restrict__ Bw,
                                                      const float* __restrict__ a_scale,
                                                      const float* __restrict__ b_scale,
                                                      const float* __restrict__ bias, OutT* __restrict__ C, int64_t M,
                                                      int64_t N, int64_t K, int64_t KQ) {
  __shared__ int32_t As[kTile][kKW + 1];
  __shared__ int32_t Bs[kTile][kKW + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool aligned = (K % 4) == 0;
  int32_t acc[4][4] = {};
  const int lr = threadIdx.x / kKW, lw = threadIdx.x % kKW;  // loader: row/col in tile, word in chunk
  for (int64_t kw0 = 0; kw0 < KQ; kw0 += kKW) {
    const int64_t kw = kw0 + lw;
    As[lr][lw] = kw < KQ ? load_a_word(A, m0 + lr, kw, M, K, aligned) : 0;
    const int64_t n = n0 + lr;
    Bs[lr][lw] = (kw < KQ && n < N) ? Bw[((n / 16) * KQ + kw) * 16 + n % 16] : 0;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kKW; ++w) {
      int32_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[ty * 4 + i][w];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[tx * 4 + j][w];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
    const float as = a_scale ? a_scale[m] : 1.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n >= N) continue;
      store_out<OutT>(C, m * N + n, acc[i][j], as, b_scale ? b_scale[n] : 1.f, bias ? bias[n] : 0.f);
    }
  }
}

template <typename T>
__global__ void quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                                     int64_t K) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  float m = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) m = fmaxf(m, fabsf(to_float<T>(xr[k])));
  __shared__ float red[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (threadIdx.x == 0) red[0] = m;
  }
  __syncthreads();
  const float amax = red[0];
  const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;  // IEEE division: same codes as the reference
  if (threadIdx.x == 0) scale[row] = __fdiv_rn(amax, 127.f);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float v = rintf(__fmul_rn(to_float<T>(xr[k]), inv));  // rint: half to even
    v = fminf(fmaxf(v, -127.f), 127.f);
    q[row * K + k] = static_cast<int8_t>(v);
  }
}

}  // namespace

cudaError_t quantize_rows(DType dtype, const void* x, int8_t* q, float* scale, int64_t M, int64_t K,
                          cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const int threads = 256;
  switch (dtype) {
    case DType::kFloat32:
      quantize_rows_kernel<float><<<M, threads, 0, stream>>>(static_cast<const float*>(x), q, scale, K);
      break;
    case DType::kBFloat16:
      quantize_rows_kernel<__nv_bfloat16><<<M, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), q, scale, K);
      break;
    case DType::kFloat16:
      quantize_rows_kernel<__half><<<M, threads, 0, stream>>>(static_cast<const __half*>(x), q, scale, K);
      break;
  }
  return cudaGetLastError();
}

cudaError_t int8_mm(const int8_t* A, const int8_t* Bp, const float* a_scale, const float* b_scale, const float* bias,
                    void* C, OutKind out, int64_t M, int64_t N, int64_t K, int64_t KQ, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);
  const int32_t* Bw = reinterpret_cast<const int32_t*>(Bp);
  switch (out) {
    case OutKind::kFloat32:
      int8_mm_kernel<float><<<grid, 256, 0, stream>>>(A, Bw, a_scale, b_scale, bias, static_cast<float*>(C), M, N, K, KQ);
      break;
    case OutKind::kBFloat16:
      int8_mm_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(A, Bw, a_scale, b_scale, bias,
                                                              static_cast<__nv_bfloat16*>(C), M, N, K, KQ);
      break;
    case OutKind::kFloat16:
      int8_mm_kernel<__half><<<grid, 256, 0, stream>>>(A, Bw, a_scale, b_scale, bias, static_cast<__half*>(C), M, N, K, KQ);
      break;
    case OutKind::kInt32:
      int8_mm_kernel<int32_t><<<grid, 256, 0, stream>>>(A, Bw, nullptr, nullptr, nullptr, static_cast<int32_t*>(C), M, N,
                                                        K, KQ);
      break;
  }
  return cudaGetLastError();
}

}  // namespace fmk::cuda
