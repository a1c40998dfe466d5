// SwiGLU: y = silu(a) * b = a * sigmoid(a) * b, forward and backward in one pass each.
//
// a, b: (..., F) with a unit last-dim stride and rows that flatten to a uniform row stride (e.g. the two
// halves of one (..., 2F) projection, no copy). y: (..., F) contiguous.
// Backward (s = sigmoid(a)): db = g * a * s;  da = g * b * s * (1 + a * (1 - s)); written into ONE
// (..., 2F) tensor [da | db], which is exactly the gradient of a packed (..., 2F) input.
// fp32 arithmetic; AVX-512 with masked tails and a portable fallback; parallel over rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/exp16.h"
#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

template <typename T>
FMK_AVX512 void swiglu_fwd_avx512(const T* a, const T* b, T* y, int64_t F) {
  for (int64_t j = 0; j < F; j += 16) {
    const __mmask16 m = tail_mask(F - j);
    const __m512 av = load16(a + j, m);
    store16(y + j, _mm512_mul_ps(_mm512_mul_ps(av, sigmoid16(av)), load16(b + j, m)), m);
  }
}

template <typename T>
FMK_AVX512 void swiglu_bwd_avx512(const T* g, const T* a, const T* b, T* da, T* db, int64_t F) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < F; j += 16) {
    const __mmask16 m = tail_mask(F - j);
    const __m512 gv = load16(g + j, m), av = load16(a + j, m), bv = load16(b + j, m);
    const __m512 s = sigmoid16(av);
    const __m512 silu = _mm512_mul_ps(av, s);
    store16(db + j, _mm512_mul_ps(gv, silu), m);
    // s * (1 + a (1 - s)), PyTorch's form: the expanded s + silu - silu * s cancels catastrophically for large a
    // (a = 63: 1.0000038 instead of 1; the fuzz suite's 2x rule caught it at |a| ~ 1e3)
    const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(av, _mm512_sub_ps(one, s), one));
    store16(da + j, _mm512_mul_ps(_mm512_mul_ps(gv, bv), dsilu), m);
  }
}

template <typename T>
void swiglu_fwd_portable(const T* a, const T* b, T* y, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    const float av = static_cast<float>(a[j]);
    y[j] = static_cast<T>(av / (1.0f + std::exp(-av)) * static_cast<float>(b[j]));
  }
}

template <typename T>
void swiglu_bwd_portable(const T* g, const T* a, const T* b, T* da, T* db, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    const float gv = static_cast<float>(g[j]), av = static_cast<float>(a[j]), bv = static_cast<float>(b[j]);
    const float s = 1.0f / (1.0f + std::exp(-av));
    const float silu = av * s;
    db[j] = static_cast<T>(gv * silu);
    da[j] = static_cast<T>(gv * bv * (s * (1.0f + av * (1.0f - s))));
  }
}

// Rows of a (..., F) tensor with unit last stride: (row count, row stride) if it flattens without a copy.
bool row_view(const at::Tensor& t, int64_t& rows, int64_t& rstride) {
  const int64_t F = t.size(-1);
  rows = F == 0 ? 0 : t.numel() / F;
  if (t.stride(-1) != 1 && F > 1) return false;
  if (t.dim() == 1) {
    rstride = F;
    return true;
  }
  rstride = t.stride(-2);
  int64_t expect = rstride;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) != 1 && t.stride(d) != expect) return false;
    expect *= t.size(d);
  }
  return true;
}

void check_ab(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": a and b must be CPU tensors");
  TORCH_CHECK(a.dim() >= 1 && a.sizes() == b.sizes(), op, ": a and b must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must share a dtype");
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_ab(a_in, b_in, "fmkernels::swiglu_fwd");
  int64_t rows, ras, rbs;
  const at::Tensor a = row_view(a_in, rows, ras) ? a_in : a_in.contiguous();
  const at::Tensor b = row_view(b_in, rows, rbs) ? b_in : b_in.contiguous();
  row_view(a, rows, ras);
  row_view(b, rows, rbs);
  const int64_t F = a.size(-1);
  at::Tensor y = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0) return y;
  const bool avx512 = use_avx512();
  FMK_DISPATCH_FLOAT_TYPES(a.scalar_type(), "swiglu_fwd_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (avx512)
          swiglu_fwd_avx512<scalar_t>(ap + r * ras, bp + r * rbs, yp + r * F, F);
        else
          swiglu_fwd_portable<scalar_t>(ap + r * ras, bp + r * rbs, yp + r * F, F);
      }
    });
  });
  return y;
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& g_in, const at::Tensor& a_in, const at::Tensor& b_in) {
  check_ab(a_in, b_in, "fmkernels::swiglu_bwd");
  TORCH_CHECK(g_in.sizes() == a_in.sizes(), "fmkernels::swiglu_bwd: grad must have a's shape ", a_in.sizes(),
              ", got ", g_in.sizes());
  int64_t rows, ras, rbs, rgs;
  const at::Tensor a = row_view(a_in, rows, ras) ? a_in : a_in.contiguous();
  const at::Tensor b = row_view(b_in, rows, rbs) ? b_in : b_in.contiguous();
  const at::Tensor g0 = g_in.to(a.scalar_type());
  const at::Tensor g = row_view(g0, rows, rgs) ? g0 : g0.contiguous();
  row_view(a, rows, ras);
  row_view(b, rows, rbs);
  row_view(g, rows, rgs);
  const int64_t F = a.size(-1);
  auto sizes = a.sizes().vec();
  sizes.back() = 2 * F;
  at::Tensor out = at::empty(sizes, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0) return out;
  const bool avx512 = use_avx512();
  FMK_DISPATCH_FLOAT_TYPES(a.scalar_type(), "swiglu_bwd_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* da = op + r * 2 * F;
        if (avx512)
          swiglu_bwd_avx512<scalar_t>(gp + r * rgs, ap + r * ras, bp + r * rbs, da, da + F, F);
        else
          swiglu_bwd_portable<scalar_t>(gp + r * rgs, ap + r * ras, bp + r * rbs, da, da + F, F);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) {
  m.impl("swiglu_fwd", &fmk::cpu::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &fmk::cpu::swiglu_bwd_cpu);
}
