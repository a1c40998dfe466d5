// 2:4 sparse matmul on sparse tensor cores (mma.sp m16n8k32, bf16/fp16 in, fp32 accumulate), sm80+.
//
// y = x @ W^T is computed as y^T = W x^T: W (N, K) is the sparse A operand (rows n), x^T the dense B operand.
// Our meta word (16 kept values = 32 columns of one W row, 2-bit positions, group i in bits 4i..4i+3) is the
// per-row metadata mma.sp m16n8k32 expects for 16-bit types; with sparsity selector 0 the thread with
// lane % 4 == 0 supplies row g's word, lane % 4 == 1 row g + 8's. One warp computes 16 W rows x 32 x rows
// (4 mma.sp per 32 columns, sharing the A fragment and metadata); 4 warps per block. Fragments are loaded
// straight from global memory (32-bit loads; values and x rows 4-byte aligned for even offsets).
// Uses mma.sp::ordered_metadata (our positions are ascending within each group). Compile-checked here (sm_80,
// sm_90a); not yet run on a GPU.
#include "cuda/common.cuh"
#include "cuda/sparse24_mm.h"

namespace fmk::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kWarpN = 16;  // W rows per warp
constexpr int kWarpM = 32;  // x rows per warp (4 x n8)

template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p, bool ok) {
  return ok ? *reinterpret_cast<const uint32_t*>(p) : 0u;
}

template <typename T> struct MmaSp;
template <> struct MmaSp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
        "{%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
#endif
  }
};
template <> struct MmaSp<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
        "{%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
#endif
  }
};

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) sparse24_mma_kernel(
    const T* __restrict__ x, const T* __restrict__ vals, const int32_t* __restrict__ meta,
    const float* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.y) * kWarps + warp) * kWarpN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kWarpM;
  if (n0 >= N) return;
  const int64_t half = K / 2, nw = K / 32;
  const int64_t na = n0 + g, nb = n0 + g + 8;
  const bool oka = na < N, okb = nb < N;
  float acc[4][4] = {};
  for (int64_t w = 0; w < nw; ++w) {
    uint32_t a[4];
    const T* va = vals + na * half + w * 16 + 2 * t;
    const T* vb = vals + nb * half + w * 16 + 2 * t;
    a[0] = ld_pair(va, oka);
    a[1] = ld_pair(vb, okb);
    a[2] = ld_pair(va + 8, oka);
    a[3] = ld_pair(vb + 8, okb);
    uint32_t e = 0;
    if (t == 0 && oka) e = static_cast<uint32_t>(meta[na * nw + w]);
    if (t == 1 && okb) e = static_cast<uint32_t>(meta[nb * nw + w]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + 8 * j + g;
      const bool okm = m < M;
      const T* xr = x + m * K + w * 32 + 2 * t;
      uint32_t b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) b[i] = ld_pair(xr + 8 * i, okm);
      MmaSp<T>::run(acc[j], a, b, e);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t mc = m0 + 8 * j + 2 * t;  // D columns (x rows) 2t, 2t+1; D rows (W rows) g, g+8
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int64_t n = (h < 2) ? na : nb;
      const int64_t m = mc + (h & 1);
      if (n < N && m < M) y[m * N + n] = from_float<T>(acc[j][h] + (bias ? bias[n] : 0.f));
    }
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* v, const int32_t* meta, const float* bias, void* y, int64_t M, int64_t N,
                   int64_t K, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((M + kWarpM - 1) / kWarpM),
                  static_cast<unsigned>((N + kWarps * kWarpN - 1) / (kWarps * kWarpN)));
  sparse24_mma_kernel<T><<<grid, kWarps * 32, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(v), meta, bias,
                                                      static_cast<T*>(y), M, N, K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse24_mm(DType dtype, const void* x, const void* values, const int32_t* meta, const float* bias, void* y,
                        int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 32) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kBFloat16: return launch<__nv_bfloat16>(x, values, meta, bias, y, M, N, K, stream);
    case DType::kFloat16: return launch<__half>(x, values, meta, bias, y, M, N, K, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fmk::cuda
