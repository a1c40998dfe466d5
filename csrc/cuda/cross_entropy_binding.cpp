// ATen binding of the CUDA cross-entropy chunk kernel (schema: fmkernels/ops/cross_entropy.py).
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/cross_entropy.h"

namespace fmk::cuda {
namespace {

at::Tensor ce_chunk_cuda(at::Tensor& logits, const at::Tensor& target, double scale, int64_t ignore_index) {
  TORCH_CHECK(logits.is_cuda() && target.is_cuda(), "fmkernels::ce_chunk_: logits and target must be CUDA tensors");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "fmkernels::ce_chunk_: logits must be contiguous (C, V)");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == logits.size(0),
              "fmkernels::ce_chunk_: target must be int64 of shape (C,)");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor t = target.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  check_launch(ce_chunk(to_dtype(logits, "logits"), logits.data_ptr(), t.data_ptr<int64_t>(), loss.data_ptr<float>(),
                        logits.size(0), logits.size(1), static_cast<float>(scale), ignore_index, current_stream()),
               "fmkernels::ce_chunk_");
  return loss;
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("ce_chunk_", &fmk::cuda::ce_chunk_cuda);
}
