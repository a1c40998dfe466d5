// Helpers for the thin ATen bindings of the CUDA kernels (compiled only in the CUDA extension).
#pragma once
// Uses c10/cuda (CUDA runtime headers only), not ATen/cuda/CUDAContext.h (which pulls in cuBLAS/cuSPARSE
// headers), so the bindings can be syntax-checked on a machine with just the CUDA toolkit's runtime.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"

namespace fmk::cuda {

inline DType to_dtype(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, arg, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int sm_count(const at::Tensor& t) {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device());
  return n > 0 ? n : 1;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace fmk::cuda
