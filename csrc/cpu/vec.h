// Shared CPU helpers: ISA targets, runtime ISA selection, and 16-lane fp32 load/store for fp32/bf16/fp16.
//
// Every AVX-512 function carries an explicit target attribute (FMK_AVX512...), so the rest of the
// library is compiled for the baseline ISA and a wheel built here runs on CPUs without AVX-512.
// Caveat: a lambda does not inherit its enclosing function's target. Put vector code in named
// `FMK_AVX512` functions and call them from the at::parallel_for lambda.
#pragma once

#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define FMK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FMK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define FMK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#define FMK_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// AT_DISPATCH over the three float dtypes the kernels take (fp32, bf16, fp16; no double).
#define FMK_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)      \
                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace fmk::cpu {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx512_fp16 = false, avx512_vbmi = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx512 = false;  // XCR0 says the OS saves ZMM state
};

// Detected once from CPUID/XGETBV (immutable afterwards).
const CpuFeatures& cpu_features();

// The ISA level kernels may use: the detected level, capped by the environment variable
// FMK_CPU_ISA=portable|avx2|avx512 (read on every call, so tests can exercise the fallbacks).
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
Isa max_isa();
const char* isa_name(Isa isa);

// AVX-512 with the extension we need and the OS support for it.
bool use_avx512();       // F + BW + VL + DQ, within the FMK_CPU_ISA cap
bool use_avx512_bf16();  // use_avx512() && avx512_bf16
bool use_avx512_vnni();  // use_avx512() && avx512_vnni
bool use_avx512_vbmi();  // use_avx512() && avx512_vbmi
bool use_avx2();         // AVX2 + FMA + F16C, within the cap

// ---- 16 x fp32 lanes from/to fp32, bf16, fp16 (AVX-512F only; bf16 stores round to nearest even) ----

FMK_AVX512 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FMK_AVX512 static inline __m512 load16(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
FMK_AVX512 static inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FMK_AVX512 static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
FMK_AVX512 static inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
FMK_AVX512 static inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// fp32 -> bf16 bits with round-to-nearest-even; NaN stays NaN (quiet).
FMK_AVX512 static inline __m256i cvt_fp32_bf16(__m512 v) {
  __m512i x = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(x, _mm512_set1_epi32(0x00400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

FMK_AVX512 static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
FMK_AVX512 static inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cvt_fp32_bf16(v));
}
FMK_AVX512 static inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
FMK_AVX512 static inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
FMK_AVX512 static inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, cvt_fp32_bf16(v));
}
FMK_AVX512 static inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

static inline __mmask16 tail_mask(int64_t n) {  // n in [0, 16]
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

}  // namespace fmk::cpu
