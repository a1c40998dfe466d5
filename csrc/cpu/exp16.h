// 16-lane fp32 exp / log for the fused training kernels (SwiGLU, cross-entropy): no Sleef dependency.
// exp16: range reduction x = n ln2 + r (|r| <= ln2/2), degree-7 Taylor polynomial (rel. error ~5e-9 before
// rounding), scaled by 2^n with vscalefps. Inputs are clamped to [-88, 89] (exp(-88) ~ 6e-39; above 88.72 the
// scaling overflows to +inf, so exp16(+inf) = +inf and sigmoid16(-inf) = 0 as in PyTorch); NaN stays NaN
// (vmaxps/vminps return their second operand when either is NaN, so x goes second), as std::exp does: a NaN
// logit reaches the cross-entropy loss and a NaN gate the SwiGLU output (issue 21).
#pragma once

#include <immintrin.h>

#include "cpu/vec.h"

namespace fmk::cpu {

FMK_AVX512 static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-88.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// sigmoid(x) = 1 / (1 + exp(-x)), exact division.
FMK_AVX512 static inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

}  // namespace fmk::cpu
