// ATen bindings of the CUDA SwiGLU kernels (schemas: fmkernels/ops/swiglu.py).
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/swiglu.h"

namespace fmk::cuda {
namespace {

// (rows, F) view with unit last stride and one row stride, copying only when the layout needs it.
at::Tensor rows_view(const at::Tensor& t) {
  const int64_t F = t.size(-1);
  at::Tensor v = t.reshape({-1, F});
  return (v.stride(-1) == 1 || F <= 1) ? v : v.contiguous();
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.is_cuda() && b_in.is_cuda(), "fmkernels::swiglu_fwd: a and b must be CUDA tensors");
  TORCH_CHECK(a_in.sizes() == b_in.sizes() && a_in.scalar_type() == b_in.scalar_type(),
              "fmkernels::swiglu_fwd: a and b must have the same shape and dtype");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = rows_view(a_in), b = rows_view(b_in);
  const int64_t F = a.size(1), rows = a.size(0);
  at::Tensor y = at::empty(a_in.sizes(), a_in.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(swiglu_fwd(to_dtype(a, "a"), a.data_ptr(), b.data_ptr(), y.data_ptr(), rows, F,
                          rows > 1 ? a.stride(0) : F, rows > 1 ? b.stride(0) : F, current_stream()),
               "fmkernels::swiglu_fwd");
  return y;
}

at::Tensor swiglu_bwd_cuda(const at::Tensor& g_in, const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.is_cuda() && b_in.is_cuda() && g_in.is_cuda(), "fmkernels::swiglu_bwd: inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = rows_view(a_in), b = rows_view(b_in), g = rows_view(g_in.to(a_in.scalar_type()));
  const int64_t F = a.size(1), rows = a.size(0);
  auto sizes = a_in.sizes().vec();
  sizes.back() = 2 * F;
  at::Tensor out = at::empty(sizes, a_in.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(swiglu_bwd(to_dtype(a, "a"), g.data_ptr(), a.data_ptr(), b.data_ptr(), out.data_ptr(), rows, F,
                          rows > 1 ? g.stride(0) : F, rows > 1 ? a.stride(0) : F, rows > 1 ? b.stride(0) : F,
                          current_stream()),
               "fmkernels::swiglu_bwd");
  return out;
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("swiglu_fwd", &fmk::cuda::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &fmk::cuda::swiglu_bwd_cuda);
}
