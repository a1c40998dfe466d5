// ATen bindings of the CUDA fused training ops (schemas: fmkernels/ops/{rope,swiglu,cross_entropy}.py).
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/fused_train.h"

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
  m.impl("rope", &fmk::cuda::rope_cuda);
  m.impl("swiglu_fwd", &fmk::cuda::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &fmk::cuda::swiglu_bwd_cuda);
  m.impl("ce_chunk_", &fmk::cuda::ce_chunk_cuda);
}
