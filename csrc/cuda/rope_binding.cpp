// ATen binding of the CUDA RoPE kernel (schema: fmkernels/ops/rope.py).
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/rope.h"

namespace fmk::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                             const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(q_in.is_cuda() && k_in.is_cuda(), "fmkernels::rope: q and k must be CUDA tensors");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, "fmkernels::rope: q and k must be 4-D (B, N, H, D)");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), "fmkernels::rope: q and k must share a dtype");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  const int64_t D = q.size(3);
  TORCH_CHECK(D % 2 == 0 && c.dim() == 2 && c.size(0) >= q.size(1) && c.size(1) == D / 2,
              "fmkernels::rope: cos/sin must be (>= N, D/2)");
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = at::empty(k.sizes(), k.options());
  check_launch(rope(to_dtype(q, "q"), q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr(), c.data_ptr<float>(),
                    s.data_ptr<float>(), q.size(0), q.size(1), q.size(2), k.size(2), D, q.stride(0), q.stride(1),
                    q.stride(2), k.stride(0), k.stride(1), k.stride(2), inverse ? -1.f : 1.f, current_stream()),
               "fmkernels::rope");
  return {qo, ko};
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("rope", &fmk::cuda::rope_cuda);
}
