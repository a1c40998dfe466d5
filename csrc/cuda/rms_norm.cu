// RMSNorm forward/backward, CUDA (sm80+). One block per row forward; backward blocks own a fixed row range
// and an fp32 dw partial row (no atomics: deterministic).
#include "cuda/common.cuh"
#include "cuda/rms_norm.h"

namespace fmk::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                                    float* __restrict__ rstd, int64_t H, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * H;
  T* yr = y + row * H;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float v = to_float(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float rs = rsqrtf(ss / static_cast<float>(H) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    float v = to_float(xr[j]) * rs;
    if (w) v *= w[j];
    yr[j] = from_float<T>(v);
  }
}

template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_partial,
                                    int64_t rows, int64_t H, int64_t rows_per_block) {
  const int64_t r0 = blockIdx.x * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  float* dwp = dw_partial ? dw_partial + blockIdx.x * H : nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * H;
    const T* xr = x + r * H;
    const float rs = rstd[r];
    float c = 0.f;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x)
      c += to_float(dyr[j]) * (w ? w[j] : 1.f) * to_float(xr[j]);
    c = block_sum(c);
    const float coef = rs * rs * rs * c / static_cast<float>(H);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const float d = to_float(dyr[j]), xv = to_float(xr[j]);
      dx[r * H + j] = from_float<T>(d * (w ? w[j] : 1.f) * rs - xv * coef);
      if (dwp) dwp[j] += d * xv * rs;  // column j is owned by this thread within this block
    }
  }
}

template <typename T>
cudaError_t launch_fwd(const void* x, const float* w, void* y, float* rstd, int64_t rows, int64_t H, float eps,
                       cudaStream_t s) {
  rms_norm_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, s>>>(
      static_cast<const T*>(x), w, static_cast<T*>(y), rstd, H, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dy, const void* x, const float* w, const float* rstd, void* dx, float* dwp,
                       int64_t rows, int64_t H, int64_t rpb, cudaStream_t s) {
  const int64_t blocks = (rows + rpb - 1) / rpb;
  rms_norm_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), w, rstd, static_cast<T*>(dx), dwp, rows, H, rpb);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_fwd(DType dtype, const void* x, const float* w, void* y, float* rstd, int64_t rows, int64_t H,
                         float eps, cudaStream_t stream) {
  if (rows == 0 || H == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(x, w, y, rstd, rows, H, eps, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(x, w, y, rstd, rows, H, eps, stream);
    case DType::kFloat16: return launch_fwd<__half>(x, w, y, rstd, rows, H, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rms_norm_bwd(DType dtype, const void* dy, const void* x, const float* w, const float* rstd, void* dx,
                         float* dw_partial, int64_t rows, int64_t H, int64_t rows_per_block, cudaStream_t stream) {
  if (rows == 0 || H == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_bwd<float>(dy, x, w, rstd, dx, dw_partial, rows, H, rows_per_block, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(dy, x, w, rstd, dx, dw_partial, rows, H, rows_per_block, stream);
    case DType::kFloat16: return launch_bwd<__half>(dy, x, w, rstd, dx, dw_partial, rows, H, rows_per_block, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fmk::cuda
