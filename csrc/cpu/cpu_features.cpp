// Runtime ISA detection (CPUID + XGETBV) and the FMK_CPU_ISA cap.
#include "cpu/vec.h"

#include <cpuid.h>
#include <cstdlib>
#include <cstring>
#include <strings.h>

#include <c10/util/Exception.h>

namespace fmk::cpu {
namespace {

uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  f.f16c = (c >> 29) & 1;
  uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = os_avx && ((xcr0 & 0xE0) == 0xE0);
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_avx && ((b >> 5) & 1);
  f.avx512f = f.os_avx512 && ((b >> 16) & 1);
  f.avx512dq = f.os_avx512 && ((b >> 17) & 1);
  f.avx512bw = f.os_avx512 && ((b >> 30) & 1);
  f.avx512vl = f.os_avx512 && ((b >> 31) & 1);
  f.avx512_vbmi = f.os_avx512 && ((c >> 1) & 1);  // gcc 12's __builtin_cpu_supports misses it on Zen 4
  f.avx512_vnni = f.os_avx512 && ((c >> 11) & 1);
  f.avx512_fp16 = f.os_avx512 && ((d >> 23) & 1);
  f.amx_bf16 = os_amx && ((d >> 22) & 1);
  f.amx_tile = os_amx && ((d >> 24) & 1);
  f.amx_int8 = os_amx && ((d >> 25) & 1);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = f.os_avx512 && ((a >> 5) & 1);
  return f;
}

// FMK_CPU_ISA, any case: portable (or scalar) | avx2 | avx512; unset or empty: no cap. Anything else is an error
// (a typo must not silently run AVX-512).
Isa env_cap() {
  const char* s = std::getenv("FMK_CPU_ISA");
  if (s == nullptr || *s == '\0') return Isa::kAvx512;
  if (strcasecmp(s, "portable") == 0 || strcasecmp(s, "scalar") == 0) return Isa::kPortable;
  if (strcasecmp(s, "avx2") == 0) return Isa::kAvx2;
  if (strcasecmp(s, "avx512") == 0) return Isa::kAvx512;
  TORCH_CHECK(false, "FMK_CPU_ISA must be one of portable, avx2, avx512 (any case) or unset, got '", s, "'");
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa max_isa() {
  const CpuFeatures& f = cpu_features();
  Isa detected = Isa::kPortable;
  if (f.avx2 && f.fma && f.f16c) detected = Isa::kAvx2;
  if (detected == Isa::kAvx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq) detected = Isa::kAvx512;
  Isa cap = env_cap();
  return static_cast<int>(cap) < static_cast<int>(detected) ? cap : detected;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

bool use_avx512() { return max_isa() == Isa::kAvx512; }
bool use_avx512_bf16() { return use_avx512() && cpu_features().avx512_bf16; }
bool use_avx512_vnni() { return use_avx512() && cpu_features().avx512_vnni; }
bool use_avx512_vbmi() { return use_avx512() && cpu_features().avx512_vbmi; }
bool use_avx2() { return static_cast<int>(max_isa()) >= static_cast<int>(Isa::kAvx2); }

}  // namespace fmk::cpu
