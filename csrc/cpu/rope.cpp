// Rotary position embedding applied to q and k in one pass (Llama "rotate half" convention).
//
// q: (B, N, Hq, D), k: (B, N, Hk, D), any strides with a unit last-dim stride; cos, sin: (N, D/2) fp32.
// For each head row x = [x1 | x2] (halves of D):  y1 = x1 cos - x2 sin,  y2 = x2 cos + x1 sin.
// inverse=true rotates by -theta (sin negated): that is the backward, so one kernel serves both.
// Outputs are new contiguous (B, N, H, D) tensors in the input dtype; arithmetic in fp32.
// Parallel over the B*N (batch, position) rows; each row handles all Hq + Hk heads (cos/sin loaded once).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

struct RopeView {
  int64_t H, s0, s1, s2;  // heads and strides (elements) of (B, N, H) dims; last dim unit stride
};

template <typename T>
FMK_AVX512 void rope_heads_avx512(const T* x, T* y, const RopeView& v, int64_t D, const float* c, const float* s,
                                  float sign) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < v.H; ++h) {
    const T* xr = x + h * v.s2;
    T* yr = y + h * D;
    for (int64_t j = 0; j < half; j += 16) {
      const __mmask16 m = tail_mask(half - j);
      const __m512 cv = _mm512_maskz_loadu_ps(m, c + j);
      const __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(sign));
      const __m512 x1 = load16(xr + j, m), x2 = load16(xr + half + j, m);
      store16(yr + j, _mm512_fnmadd_ps(x2, sv, _mm512_mul_ps(x1, cv)), m);
      store16(yr + half + j, _mm512_fmadd_ps(x1, sv, _mm512_mul_ps(x2, cv)), m);
    }
  }
}

template <typename T>
void rope_heads_portable(const T* x, T* y, const RopeView& v, int64_t D, const float* c, const float* s, float sign) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < v.H; ++h) {
    const T* xr = x + h * v.s2;
    T* yr = y + h * D;
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = static_cast<float>(xr[j]), x2 = static_cast<float>(xr[half + j]);
      const float cv = c[j], sv = sign * s[j];
      yr[j] = static_cast<T>(x1 * cv - x2 * sv);
      yr[half + j] = static_cast<T>(x2 * cv + x1 * sv);
    }
  }
}

void check_qk(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fmkernels::rope: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "fmkernels::rope: ", name, " must be 4-D (B, N, H, D), got shape ", t.sizes());
  TORCH_CHECK(t.size(3) % 2 == 0, "fmkernels::rope: ", name, " head dim must be even, got ", t.size(3));
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos_in,
                                            const at::Tensor& sin_in, bool inverse) {
  check_qk(q_in, "q");
  check_qk(k_in, "k");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), "fmkernels::rope: q and k must share a dtype");
  const int64_t B = q_in.size(0), N = q_in.size(1), D = q_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == N && k_in.size(3) == D,
              "fmkernels::rope: k must be (B, N, Hk, D) matching q's B, N, D; got ", k_in.sizes());
  TORCH_CHECK(cos_in.dim() == 2 && cos_in.size(0) >= N && cos_in.size(1) == D / 2 && sin_in.sizes() == cos_in.sizes(),
              "fmkernels::rope: cos and sin must be (>= N, D/2) = (", N, ", ", D / 2, "), got ", cos_in.sizes(), " and ",
              sin_in.sizes());
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor c = cos_in.to(at::kFloat).contiguous(), s = sin_in.to(at::kFloat).contiguous();
  at::Tensor qo = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ko = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * N == 0 || D == 0) return {qo, ko};
  const RopeView vq{q.size(2), q.stride(0), q.stride(1), q.stride(2)};
  const RopeView vk{k.size(2), k.stride(0), k.stride(1), k.stride(2)};
  const float sign = inverse ? -1.0f : 1.0f;
  const bool avx512 = use_avx512();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  FMK_DISPATCH_FLOAT_TYPES(q.scalar_type(), "rope_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* qop = qo.data_ptr<scalar_t>();
    scalar_t* kop = ko.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N, n = r % N;
        const float* cr = cp + n * (D / 2);
        const float* sr = sp + n * (D / 2);
        const scalar_t* qr = qp + b * vq.s0 + n * vq.s1;
        const scalar_t* kr = kp + b * vk.s0 + n * vk.s1;
        scalar_t* qor = qop + r * vq.H * D;
        scalar_t* kor = kop + r * vk.H * D;
        if (avx512) {
          rope_heads_avx512<scalar_t>(qr, qor, vq, D, cr, sr, sign);
          rope_heads_avx512<scalar_t>(kr, kor, vk, D, cr, sr, sign);
        } else {
          rope_heads_portable<scalar_t>(qr, qor, vq, D, cr, sr, sign);
          rope_heads_portable<scalar_t>(kr, kor, vk, D, cr, sr, sign);
        }
      }
    });
  });
  return {qo, ko};
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) { m.impl("rope", &fmk::cpu::rope_cpu); }
