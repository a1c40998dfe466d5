// ATen binding of the CUDA 2:4 sparse matmul (schema: fmkernels/ops/sparse.py).
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/sparse24_mm.h"

namespace fmk::cuda {
namespace {

at::Tensor sparse24_mm_cuda(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& meta_in,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.is_cuda() && values_in.is_cuda() && meta_in.is_cuda(),
              "fmkernels::sparse24_mm: x, values, meta must be CUDA tensors");
  TORCH_CHECK(x_in.scalar_type() == values_in.scalar_type(), "fmkernels::sparse24_mm: x and values must share a dtype");
  TORCH_CHECK(x_in.size(1) % 32 == 0, "fmkernels::sparse24_mm (cuda): K must be a multiple of 32, got ", x_in.size(1));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), meta = meta_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(sparse24_mm(to_dtype(x, "x"), x.data_ptr(), values.data_ptr(), meta.data_ptr<int32_t>(),
                           bias.has_value() ? b32.data_ptr<float>() : nullptr, y.data_ptr(), M, N, K, current_stream()),
               "fmkernels::sparse24_mm");
  return y;
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("sparse24_mm", &fmk::cuda::sparse24_mm_cuda);
}
