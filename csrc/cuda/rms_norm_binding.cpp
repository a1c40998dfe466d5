// ATen binding of the CUDA RMSNorm kernels (schema: fmkernels/ops/rms_norm.py).
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/rms_norm.h"

namespace fmk::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                    double eps) {
  TORCH_CHECK(x_in.is_cuda(), "fmkernels::rms_norm_fwd: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  at::Tensor y = at::empty_like(x);
  auto rs_sizes = x.sizes().vec();
  rs_sizes.pop_back();
  at::Tensor rstd = at::empty(rs_sizes, x.options().dtype(at::kFloat));
  at::Tensor w32 = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(rms_norm_fwd(to_dtype(x, "x"), x.data_ptr(), weight.has_value() ? w32.data_ptr<float>() : nullptr,
                            y.data_ptr(), rstd.data_ptr<float>(), rows, H, static_cast<float>(eps),
                            current_stream()),
               "fmkernels::rms_norm_fwd");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                    const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                    bool compute_dweight) {
  TORCH_CHECK(x_in.is_cuda() && dy_in.is_cuda(), "fmkernels::rms_norm_bwd: inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  at::Tensor dx = at::empty_like(x);
  const bool want_dw = compute_dweight && weight.has_value();
  const int64_t sms = sm_count(x);
  const int64_t rpb = std::max<int64_t>(1, (rows + 4 * sms - 1) / (4 * sms));
  const int64_t blocks = rows ? (rows + rpb - 1) / rpb : 1;
  at::Tensor partial = want_dw ? at::zeros({blocks, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor w32 = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(rms_norm_bwd(to_dtype(x, "x"), dy.data_ptr(), x.data_ptr(),
                            weight.has_value() ? w32.data_ptr<float>() : nullptr, rstd.contiguous().data_ptr<float>(),
                            dx.data_ptr(), want_dw ? partial.data_ptr<float>() : nullptr, rows, H, rpb,
                            current_stream()),
               "fmkernels::rms_norm_bwd");
  at::Tensor dw = want_dw ? partial.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw};
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("rms_norm_fwd", &fmk::cuda::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &fmk::cuda::rms_norm_bwd_cuda);
}
