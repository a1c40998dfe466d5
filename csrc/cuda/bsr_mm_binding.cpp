// ATen binding of the CUDA block-sparse matmul (schema: fmkernels/ops/sparse.py).
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/bsr_mm.h"

namespace fmk::cuda {
namespace {

at::Tensor bsr_mm_cuda(const at::Tensor& x_in, const at::Tensor& blocks_in, const at::Tensor& row_ptr,
                       const at::Tensor& col_idx, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.is_cuda() && blocks_in.is_cuda(), "fmkernels::bsr_mm: x and blocks must be CUDA tensors");
  TORCH_CHECK(x_in.scalar_type() == blocks_in.scalar_type(), "fmkernels::bsr_mm: x and blocks must share a dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), blocks = blocks_in.contiguous();
  const int b = static_cast<int>(blocks.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = (row_ptr.size(0) - 1) * b;
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(bsr_mm(to_dtype(x, "x"), x.data_ptr(), blocks.data_ptr(), row_ptr.contiguous().data_ptr<int32_t>(),
                      col_idx.contiguous().data_ptr<int32_t>(), bias.has_value() ? b32.data_ptr<float>() : nullptr,
                      y.data_ptr(), M, N, K, b, current_stream()),
               "fmkernels::bsr_mm");
  return y;
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("bsr_mm", &fmk::cuda::bsr_mm_cuda);
}
