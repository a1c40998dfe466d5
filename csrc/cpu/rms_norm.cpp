// RMSNorm forward and backward on CPU: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), over the last dim.
//
// x: (rows, H) contiguous, fp32 / bf16 / fp16; w: (H,) any float dtype (converted to fp32 once);
// rstd: (rows,) fp32, saved for the backward. All arithmetic in fp32.
// Backward per row (xhat = x * rstd, g = dy * w):
//   dx = rstd * (g - xhat * mean(g * xhat)) = rstd * g - x * rstd^3 * sum(g * x) / H
//   dw = sum over rows of dy * xhat   (per-chunk fp32 partials over a fixed row split, summed in chunk order:
//        bit-identical across runs and thread counts)
// Parallel over rows (at::parallel_for); AVX-512 with masked tails, portable scalar fallback.
// Measured (2 cores, AVX-512, 4096x4096, fwd+bwd): see benchmarks/bench_rms_norm.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

// ---------------------------------------------------------------- AVX-512

template <typename T>
FMK_AVX512 void rms_fwd_rows_avx512(const T* x, const float* w, T* y, float* rstd, int64_t r0, int64_t r1,
                                    int64_t H, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * H;
    T* yr = y + r * H;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= H; j += 32) {
      __m512 a = load16(xr + j), b = load16(xr + j + 16);
      acc0 = _mm512_fmadd_ps(a, a, acc0);
      acc1 = _mm512_fmadd_ps(b, b, acc1);
    }
    for (; j < H; j += 16) {
      __m512 a = load16(xr + j, tail_mask(H - j));
      acc0 = _mm512_fmadd_ps(a, a, acc0);
    }
    const float ss = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    rstd[r] = rs;
    const __m512 vr = _mm512_set1_ps(rs);
    for (j = 0; j + 16 <= H; j += 16) {
      __m512 v = _mm512_mul_ps(load16(xr + j), vr);
      if (w) v = _mm512_mul_ps(v, _mm512_loadu_ps(w + j));
      store16(yr + j, v);
    }
    if (j < H) {
      const __mmask16 m = tail_mask(H - j);
      __m512 v = _mm512_mul_ps(load16(xr + j, m), vr);
      if (w) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + j));
      store16(yr + j, v, m);
    }
  }
}

template <typename T>
FMK_AVX512 void rms_bwd_rows_avx512(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                                    float* dw_acc, int64_t r0, int64_t r1, int64_t H) {
  const __m512 ones = _mm512_set1_ps(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * H;
    const T* xr = x + r * H;
    T* dxr = dx + r * H;
    const float rs = rstd[r];
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < H; j += 16) {
      const __mmask16 m = tail_mask(H - j);
      __m512 g = load16(dyr + j, m);
      if (w) g = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + j));
      acc = _mm512_fmadd_ps(g, load16(xr + j, m), acc);
    }
    const float c = _mm512_reduce_add_ps(acc);
    const __m512 vr = _mm512_set1_ps(rs);
    const __m512 coef = _mm512_set1_ps(rs * rs * rs * c / static_cast<float>(H));
    for (int64_t j = 0; j < H; j += 16) {
      const __mmask16 m = tail_mask(H - j);
      const __m512 d = load16(dyr + j, m);
      const __m512 xv = load16(xr + j, m);
      const __m512 wv = w ? _mm512_maskz_loadu_ps(m, w + j) : ones;
      const __m512 g = _mm512_mul_ps(d, wv);
      store16(dxr + j, _mm512_fnmadd_ps(xv, coef, _mm512_mul_ps(g, vr)), m);
      if (dw_acc) {
        __m512 a = _mm512_maskz_loadu_ps(m, dw_acc + j);
        a = _mm512_fmadd_ps(d, _mm512_mul_ps(xv, vr), a);
        _mm512_mask_storeu_ps(dw_acc + j, m, a);
      }
    }
  }
}

// ---------------------------------------------------------------- portable

template <typename T>
void rms_fwd_rows_portable(const T* x, const float* w, T* y, float* rstd, int64_t r0, int64_t r1, int64_t H,
                           float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * H;
    float ss = 0.f;
    for (int64_t j = 0; j < H; ++j) {
      const float v = static_cast<float>(xr[j]);
      ss += v * v;
    }
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    rstd[r] = rs;
    for (int64_t j = 0; j < H; ++j) {
      float v = static_cast<float>(xr[j]) * rs;
      if (w) v *= w[j];
      y[r * H + j] = static_cast<T>(v);
    }
  }
}

template <typename T>
void rms_bwd_rows_portable(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_acc,
                           int64_t r0, int64_t r1, int64_t H) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * H;
    const T* xr = x + r * H;
    const float rs = rstd[r];
    float c = 0.f;
    for (int64_t j = 0; j < H; ++j) c += static_cast<float>(dyr[j]) * (w ? w[j] : 1.f) * static_cast<float>(xr[j]);
    const float coef = rs * rs * rs * c / static_cast<float>(H);
    for (int64_t j = 0; j < H; ++j) {
      const float d = static_cast<float>(dyr[j]);
      const float xv = static_cast<float>(xr[j]);
      dx[r * H + j] = static_cast<T>(d * (w ? w[j] : 1.f) * rs - xv * coef);
      if (dw_acc) dw_acc[j] += d * xv * rs;
    }
  }
}

// ---------------------------------------------------------------- launchers

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(-1), op, ": weight must have shape (",
                x.size(-1), ",), got ", weight->sizes());
    TORCH_CHECK(weight->device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight->device());
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                   double eps) {
  check_inputs(x_in, weight, "fmkernels::rms_norm_fwd");
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(-1);
  const int64_t rows = H == 0 ? 0 : x.numel() / H;
  at::Tensor y = at::empty_like(x);
  auto rstd_sizes = x.sizes().vec();
  rstd_sizes.pop_back();
  at::Tensor rstd = at::empty(rstd_sizes, x.options().dtype(at::kFloat));
  if (rows == 0 || H == 0) return {y, rstd};
  at::Tensor w32;
  if (weight.has_value()) w32 = weight->to(at::kFloat).contiguous();
  const float* w = weight.has_value() ? w32.data_ptr<float>() : nullptr;
  float* rs = rstd.data_ptr<float>();
  const bool avx512 = use_avx512();
  const float feps = static_cast<float>(eps);
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      if (avx512)
        rms_fwd_rows_avx512<scalar_t>(xp, w, yp, rs, r0, r1, H, feps);
      else
        rms_fwd_rows_portable<scalar_t>(xp, w, yp, rs, r0, r1, H, feps);
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                   const std::optional<at::Tensor>& weight, const at::Tensor& rstd_in,
                                                   bool compute_dweight) {
  check_inputs(x_in, weight, "fmkernels::rms_norm_bwd");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "fmkernels::rms_norm_bwd: grad_out must have x's shape ", x_in.sizes(),
              ", got ", dy_in.sizes());
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat && rstd_in.numel() * x_in.size(-1) == x_in.numel(),
              "fmkernels::rms_norm_bwd: rstd must be float32 with one value per row");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t H = x.size(-1);
  const int64_t rows = H == 0 ? 0 : x.numel() / H;
  at::Tensor dx = at::empty_like(x);
  const bool want_dw = compute_dweight && weight.has_value();
  at::Tensor dw = want_dw ? at::zeros({H}, x.options().dtype(at::kFloat)) : at::empty({0}, x.options());
  if (rows == 0 || H == 0) return {dx, want_dw ? dw.to(weight->scalar_type()) : dw};

  at::Tensor w32;
  if (weight.has_value()) w32 = weight->to(at::kFloat).contiguous();
  const float* w = weight.has_value() ? w32.data_ptr<float>() : nullptr;
  const float* rs = rstd.data_ptr<float>();
  const bool avx512 = use_avx512();
  // Fixed row chunks that depend on the row count only (never on the thread count): each chunk owns one fp32 dw
  // partial, and the partials are summed in chunk order afterwards, so dw is bit-identical across runs AND thread
  // counts (issue 21). At most 64 chunks of >= 16 rows: 64 x H fp32 partials (1 MiB at H 4096), enough chunks to
  // balance up to 16 threads.
  const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>(64, (rows + 15) / 16));
  at::Tensor partial = want_dw ? at::zeros({nchunk, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  float* pp = want_dw ? partial.data_ptr<float>() : nullptr;

  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, nchunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = rows * c / nchunk, r1 = rows * (c + 1) / nchunk;
        float* acc = pp ? pp + c * H : nullptr;
        if (avx512)
          rms_bwd_rows_avx512<scalar_t>(dyp, xp, w, rs, dxp, acc, r0, r1, H);
        else
          rms_bwd_rows_portable<scalar_t>(dyp, xp, w, rs, dxp, acc, r0, r1, H);
      }
    });
  });
  if (want_dw) {
    float* d = dw.data_ptr<float>();
    at::parallel_for(0, H, 1024, [&](int64_t j0, int64_t j1) {  // columns split across threads; order per column fixed
      for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t j = j0; j < j1; ++j) d[j] += pp[c * H + j];
    });
    dw = dw.to(weight->scalar_type());
  }
  return {dx, dw};
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) {
  m.impl("rms_norm_fwd", &fmk::cpu::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &fmk::cpu::rms_norm_bwd_cpu);
}
