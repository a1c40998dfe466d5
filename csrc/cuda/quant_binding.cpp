// ATen bindings of the CUDA quantized GEMMs (schemas: fmkernels/ops/quant.py). Argument checks name the argument;
// the Python ops validate first.
#include <torch/library.h>

#include "cuda/binding_utils.h"
#include "cuda/quant.h"

namespace fmk::cuda {
namespace {

OutKind out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return OutKind::kFloat32;
    case at::kBFloat16: return OutKind::kBFloat16;
    case at::kHalf: return OutKind::kFloat16;
    case at::kInt: return OutKind::kInt32;
    default: TORCH_CHECK(false, "fmkernels::int8_mm: out_dtype must be float32, bfloat16, float16 or int32, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_per_row_cuda(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 2, "fmkernels::quantize_per_row: x must be a 2-D CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor s = at::zeros({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(1) > 0)
    check_launch(quantize_rows(to_dtype(x, "x"), x.data_ptr(), q.data_ptr<int8_t>(), s.data_ptr<float>(), x.size(0),
                               x.size(1), current_stream()),
                 "fmkernels::quantize_per_row");
  return {q, s};
}

at::Tensor int8_mm_cuda(const at::Tensor& a_in, const at::Tensor& a_scale, const at::Tensor& bp,
                        const at::Tensor& comp, const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                        at::ScalarType out_dtype) {
  const char* op = "fmkernels::int8_mm";
  TORCH_CHECK(a_in.is_cuda() && bp.is_cuda(), op, ": a and b_packed must be CUDA tensors");
  TORCH_CHECK(a_in.scalar_type() == at::kChar && a_in.dim() == 2, op, ": a must be 2-D int8");
  TORCH_CHECK(bp.scalar_type() == at::kChar && bp.dim() == 4 && bp.size(2) == 16 && bp.size(3) == 4 && bp.is_contiguous(),
              op, ": b_packed must be contiguous int8 (N/16, K/4, 16, 4)");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b_scale.size(0);
  TORCH_CHECK(bp.size(1) * 4 >= K && bp.size(1) * 4 < K + 4, op, ": b_packed was packed for another K");
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  const at::Tensor as = a_scale.to(at::kFloat).contiguous(), bs = b_scale.to(at::kFloat).contiguous();
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(int8_mm(a.data_ptr<int8_t>(), bp.data_ptr<int8_t>(), as.data_ptr<float>(), bs.data_ptr<float>(),
                       bias.has_value() ? b32.data_ptr<float>() : nullptr, out.data_ptr(), out_kind(out_dtype), M, N,
                       K, bp.size(1), current_stream()),
               op);
  return out;
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& bp, const at::Tensor& comp,
                            const at::Tensor& b_scale, const std::optional<at::Tensor>& bias) {
  auto [q, s] = quantize_per_row_cuda(x);
  return int8_mm_cuda(q, s, bp, comp, b_scale, bias, x.scalar_type());
}

at::Tensor int4_mm_cuda(const at::Tensor& x_in, const at::Tensor& wp, const at::Tensor& scale, const at::Tensor& zero,
                        int64_t group_size, int64_t n, const std::optional<at::Tensor>& bias, int64_t act_terms) {
  const char* op = "fmkernels::int4_mm";
  TORCH_CHECK(x_in.is_cuda() && wp.is_cuda(), op, ": x and w_packed must be CUDA tensors");
  TORCH_CHECK(wp.scalar_type() == at::kByte && wp.dim() == 4 && wp.is_contiguous(), op,
              ": w_packed must be contiguous uint8 (N/16, K/8, 16, 4)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(wp.size(1) * 8 == K && K % group_size == 0, op, ": w_packed / group_size do not match K=", K);
  at::Tensor out = at::empty({M, n}, x.options());
  const at::Tensor s = scale.contiguous(), z = zero.contiguous();
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(int4_mm(to_dtype(x, "x"), x.data_ptr(), wp.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<float>(),
                       bias.has_value() ? b32.data_ptr<float>() : nullptr, out.data_ptr(), M, n, K, wp.size(0) * 16,
                       group_size, current_stream()),
               op);
  return out;
}

at::Tensor int8_weight_only_mm_cuda(const at::Tensor& x_in, const at::Tensor& wp, const at::Tensor& scale,
                                    int64_t group_size, int64_t n, const std::optional<at::Tensor>& bias) {
  const char* op = "fmkernels::int8_weight_only_mm";
  TORCH_CHECK(x_in.is_cuda() && wp.is_cuda(), op, ": x and w_packed must be CUDA tensors");
  TORCH_CHECK(wp.scalar_type() == at::kByte && wp.dim() == 4 && wp.is_contiguous(), op,
              ": w_packed must be contiguous uint8 (Np/16, K/4, 16, 4)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(wp.size(1) * 4 == K && group_size > 0 && K % group_size == 0, op,
              ": w_packed / group_size do not match K=", K);
  at::Tensor out = at::empty({M, n}, x.options());
  const at::Tensor s = scale.contiguous();
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(int8_weight_only_mm(to_dtype(x, "x"), x.data_ptr(), wp.data_ptr<uint8_t>(), s.data_ptr<float>(),
                                   bias.has_value() ? b32.data_ptr<float>() : nullptr, out.data_ptr(), M, n, K,
                                   wp.size(0) * 16, group_size, current_stream()),
               op);
  return out;
}

at::Tensor fp8_mm_cuda(const at::Tensor& a_in, const at::Tensor& a_scale, const at::Tensor& b_in,
                       const at::Tensor& b_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const char* op = "fmkernels::fp8_mm";
  TORCH_CHECK(a_in.is_cuda() && b_in.is_cuda(), op, ": a and b must be CUDA tensors");
  TORCH_CHECK(a_in.scalar_type() == at::kFloat8_e4m3fn && b_in.scalar_type() == at::kFloat8_e4m3fn, op,
              ": a and b must be float8_e4m3fn");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  const at::Tensor as = a_scale.to(at::kFloat).reshape({-1}).contiguous();
  const at::Tensor bs = b_scale.to(at::kFloat).reshape({-1}).contiguous();
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  check_launch(fp8_mm(static_cast<const uint8_t*>(a.data_ptr()), static_cast<const uint8_t*>(b.data_ptr()),
                      as.data_ptr<float>(), as.numel() > 1 ? 1 : 0, bs.data_ptr<float>(), bs.numel() > 1 ? 1 : 0,
                      bias.has_value() ? b32.data_ptr<float>() : nullptr, to_dtype(out, "out_dtype"), out.data_ptr(),
                      M, N, K, current_stream()),
               op);
  return out;
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("quantize_per_row", &fmk::cuda::quantize_per_row_cuda);
  m.impl("int8_mm", &fmk::cuda::int8_mm_cuda);
  m.impl("int8_linear", &fmk::cuda::int8_linear_cuda);
  m.impl("int4_mm", &fmk::cuda::int4_mm_cuda);
  m.impl("fp8_mm", &fmk::cuda::fp8_mm_cuda);
  m.impl("int8_weight_only_mm", &fmk::cuda::int8_weight_only_mm_cuda);
}
