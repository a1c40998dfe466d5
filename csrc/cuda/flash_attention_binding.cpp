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

// ---- varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D) viewed as (1, H, T, D); cu_seqlens int32 (nseq + 1,) on the device.
// The tables are checked on the host (one copy) so that a bad table can never make a kernel read out of bounds.
AttnShape varlen_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                       const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t left,
                       int64_t right, const char* op) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}})
    TORCH_CHECK(t->dim() == 3, op, ": ", name, " must be 3-D (total, H, D), got shape ", t->sizes());
  AttnShape s = make_shape(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                           v.transpose(0, 1).unsqueeze(0), scale, left, right, op);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &cu_q}, {"cu_seqlens_k", &cu_k}})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous(), op, ": ", name,
                " must be a contiguous CUDA int32 1-D tensor");
  TORCH_CHECK(cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1, op, ": cu_seqlens must have the same length >= 1");
  const at::Tensor hq = cu_q.cpu(), hk = cu_k.cpu();
  const int32_t* pq = hq.const_data_ptr<int32_t>();
  const int32_t* pk = hk.const_data_ptr<int32_t>();
  const int64_t n = cu_q.numel() - 1;
  TORCH_CHECK(pq[0] == 0 && pk[0] == 0 && pq[n] == q.size(0) && pk[n] == k.size(0), op,
              ": cu_seqlens must start at 0 and end at the total rows");
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(pq[i + 1] >= pq[i] && pk[i + 1] >= pk[i] && pq[i + 1] - pq[i] <= max_q && pk[i + 1] - pk[i] <= max_k,
                op, ": cu_seqlens must be non-decreasing with lengths <= max_seqlen (sequence ", i, ")");
  s.cu_q = cu_q.const_data_ptr<int32_t>();
  s.cu_k = cu_k.const_data_ptr<int32_t>();
  s.nseq = n, s.max_nq = max_q, s.max_nk = max_k;
  return s;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_varlen_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_varlen_fwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const AttnShape s = varlen_shape(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, op);
  at::Tensor out = at::empty({s.Hq, s.Nq, s.D}, q.options());  // (Hq, Tq, D): the kernels' (1, Hq, N, D) layout
  at::Tensor lse = at::empty({s.Hq, s.Nq}, q.options().dtype(at::kFloat));
  check_launch(flash_attention_fwd(to_dtype(q, "q"), s, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                   lse.data_ptr<float>(), current_stream()),
               op);
  return {out.transpose(0, 1).contiguous(), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_varlen_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
    int64_t max_k, double scale, int64_t window_left, int64_t window_right) {
  const char* op = "fmkernels::flash_attention_varlen_bwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const AttnShape s = varlen_shape(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, op);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out and out must have q's shape");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == s.Hq && lse.size(1) == s.Nq, op, ": lse must be (Hq, total_q)");
  const at::Tensor dO = unit_last(grad_out.to(q.scalar_type()));
  const at::Tensor delta = (dO.to(at::kFloat) * out.to(at::kFloat)).sum(-1).transpose(0, 1).contiguous();  // (Hq, Tq)
  at::Tensor lse2 = lse.to(at::kFloat) * 1.4426950408889634;
  lse2 = at::where(at::isinf(lse2), at::full({}, std::numeric_limits<float>::infinity(), lse2.options()), lse2)
             .contiguous();
  at::Tensor dq = at::zeros({s.Hq, s.Nq, s.D}, q.options());
  at::Tensor dk = at::zeros({s.Hkv, s.Nk, s.D}, k.options());
  at::Tensor dv = at::zeros({s.Hkv, s.Nk, s.D}, v.options());
  const int64_t sdo[3] = {0, dO.stride(1), dO.stride(0)};
  check_launch(flash_attention_bwd(to_dtype(q, "q"), s, sdo, q.data_ptr(), k.data_ptr(), v.data_ptr(), dO.data_ptr(),
                                   lse2.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                                   dv.data_ptr(), current_stream()),
               op);
  return {dq.transpose(0, 1).contiguous(), dk.transpose(0, 1).contiguous(), dv.transpose(0, 1).contiguous()};
}

}  // namespace
}  // namespace fmk::cuda

TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) {
  m.impl("flash_attention_fwd", &fmk::cuda::flash_attention_fwd_cuda);
  m.impl("flash_attention_bwd", &fmk::cuda::flash_attention_bwd_cuda);
  m.impl("flash_attention_varlen_fwd", &fmk::cuda::flash_attention_varlen_fwd_cuda);
  m.impl("flash_attention_varlen_bwd", &fmk::cuda::flash_attention_varlen_bwd_cuda);
}
