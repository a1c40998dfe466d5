// ATen binding of the CUDA flash attention kernels (schema: fmkernels/ops/attention.py).
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cuda/binding_utils.h"
#include "cuda/flash_attention.h"

namespace fmk::cuda {
namespace {

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

AttnShape make_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t left,
                     int64_t right, const char* op) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (B, H, N, D), got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type());
  }
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k must have q's batch and head dim");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": q's heads must be a multiple of k's heads");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256, op, ": head dim must be in [1, 256], got ", q.size(3));
  AttnShape s{};
  s.B = q.size(0), s.Hq = q.size(1), s.Hkv = k.size(1), s.Nq = q.size(2), s.Nk = k.size(2), s.D = q.size(3);
  s.window_left = left, s.window_right = right, s.scale = static_cast<float>(scale);
  for (int i = 0; i < 3; ++i) s.sq[i] = q.stride(i), s.sk[i] = k.stride(i), s.sv[i] = v.stride(i);
  return s;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, double scale, int64_t window_left,
                                                           int64_t window_right) {
  const char* op = "fmkernels::flash_attention_fwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const AttnShape s = make_shape(q, k, v, scale, window_left, window_right, op);
  at::Tensor out = at::empty({s.B, s.Hq, s.Nq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Nq}, q.options().dtype(at::kFloat));
  if (s.Nk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  check_launch(flash_attention_fwd(to_dtype(q, "q"), s, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                   lse.data_ptr<float>(), current_stream()),
               op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_bwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const AttnShape s = make_shape(q, k, v, scale, window_left, window_right, op);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out and out must have q's shape");
  const at::Tensor dO = unit_last(grad_out.to(q.scalar_type()));
  const at::Tensor delta = (dO.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor lse2 = lse.to(at::kFloat) * 1.4426950408889634;
  lse2 = at::where(at::isinf(lse2), at::full({}, std::numeric_limits<float>::infinity(), lse2.options()), lse2)
             .contiguous();
  at::Tensor dq = at::empty({s.B, s.Hq, s.Nq, s.D}, q.options());
  at::Tensor dk = at::zeros({s.B, s.Hkv, s.Nk, s.D}, k.options());
  at::Tensor dv = at::zeros({s.B, s.Hkv, s.Nk, s.D}, v.options());
  const int64_t sdo[3] = {dO.stride(0), dO.stride(1), dO.stride(2)};
  check_launch(flash_attention_bwd(to_dtype(q, "q"), s, sdo, q.data_ptr(), k.data_ptr(), v.data_ptr(), dO.data_ptr(),
                                   lse2.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                                   dv.data_ptr(), current_stream()),
               op);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("flash_attention_fwd", &fmk::cuda::flash_attention_fwd_cuda);
  m.impl("flash_attention_bwd", &fmk::cuda::flash_attention_bwd_cuda);
}
