// int4 weight-only GEMM: out = x @ dequant(W)^T (+ bias), W int4 with group-wise scales and zero points along K:
//   W[n, k] = (q[n, k] - zero[g, n]) * scale[g, n],  g = k / group_size,  q in [0, 15].
//
// Packed layout (int4_pack_weight): Wp[N/16][K/8][16][4] bytes, byte = q[n, 8t + j] | q[n, 8t + 4 + j] << 4, so one
// 64-byte load holds two VNNI k-steps (low nibbles: k 8t..8t+3, high nibbles: 8t+4..8t+7) for 16 columns;
// scale / zero are fp32 (K/G, Np).
// Compute (on AVX-512 VNNI): activations are quantized per row on the fly (dynamic, symmetric int8), as one
// term (W4A8) or two terms hi + lo/254 (~15-bit activations, the default "A16" mode); per group
//   acc = sum_k q * a  (vpdpbusd: nibbles are the u8 operand, activation codes the s8 broadcast operand)
//   y  += scale * (acc - zero * sum_k a)        (int32 exact within a group, fp32 across groups)
// Nibbles are unpacked in registers (and / shift), never written out: the weights stream once per row block.
// Micro-kernel: 4 rows x 48 columns (12 int32 + 12 fp32 zmm accumulators); parallel over column panels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/quant_common.h"
#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

using quant::round_up;

constexpr int kMR = 4;
constexpr int kNB = 3;

struct Int4Args {
  const int8_t* A;       // (R, K) signed activation codes, R = M * terms
  const float* a_scale;  // (R,)
  const int32_t* asum;   // (R, ngroups) per-group sums of the codes
  const uint8_t* B;      // packed weights
  const float* scale;    // (ngroups, Np)
  const float* zero;     // (ngroups, Np)
  float* C;              // (R, N) fp32, = (x_term @ W^T) * a_scale
  int64_t K, N, Np, G, ngroups;
};

// Named accumulators (GCC spills arrays of zmm); activations as embedded {1to16} broadcast operands (inline asm).
#define FMK_DPB(c, b, p) __asm__("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(c) : "m"(*(const int32_t*)(p)), "v"(b))
#define FMK_I4_DECL(i) __m512i c##i##0, c##i##1, c##i##2; __m512 f##i##0 = zf, f##i##1 = zf, f##i##2 = zf;
#define FMK_I4_ZERO(i) c##i##0 = zi; c##i##1 = zi; c##i##2 = zi;
#define FMK_I4_DP(i, j)                                           \
  if constexpr (MR > i) {                                         \
    const int8_t* ap = p.A + (m0 + i) * p.K + 8 * t;              \
    FMK_DPB(c##i##j, lo, ap);                                     \
    FMK_DPB(c##i##j, hi, ap + 4);                                 \
  }
#define FMK_I4_COL(j)                                                              \
  if constexpr (NB > j) {                                                          \
    const __m512i v = _mm512_loadu_si512(B + j * ldb + t * 64);                    \
    const __m512i lo = _mm512_and_si512(v, low);                                   \
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);            \
    FMK_I4_DP(0, j) FMK_I4_DP(1, j) FMK_I4_DP(2, j) FMK_I4_DP(3, j)                \
  }
#define FMK_I4_EPI(i, j)                                                                           \
  if constexpr (MR > i) {                                                                          \
    const __m512 as = _mm512_set1_ps(static_cast<float>(p.asum[(m0 + i) * p.ngroups + g]));       \
    f##i##j = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(zp, as, _mm512_cvtepi32_ps(c##i##j)), f##i##j); \
  }
#define FMK_I4_EPICOL(j)                                                  \
  if constexpr (NB > j) {                                                 \
    const __m512 s = _mm512_loadu_ps(p.scale + g * p.Np + n0 + 16 * j);   \
    const __m512 zp = _mm512_loadu_ps(p.zero + g * p.Np + n0 + 16 * j);   \
    FMK_I4_EPI(0, j) FMK_I4_EPI(1, j) FMK_I4_EPI(2, j) FMK_I4_EPI(3, j)   \
  }
#define FMK_I4_STORE(i, j)                                                                           \
  if constexpr (MR > i && NB > j) {                                                                  \
    const int64_t n = n0 + 16 * j;                                                                   \
    if (n < p.N)                                                                                     \
      _mm512_mask_storeu_ps(p.C + (m0 + i) * p.N + n, tail_mask(p.N - n),                            \
                            _mm512_mul_ps(f##i##j, _mm512_set1_ps(p.a_scale[m0 + i])));              \
  }

template <int MR, int NB>
FMK_AVX512_VNNI void ukernel_int4(const Int4Args& p, int64_t m0, int64_t b0) {
  const int64_t ldb = (p.K / 8) * 64;
  const uint8_t* B = p.B + b0 * ldb;
  const int64_t n0 = b0 * 16;
  const int64_t gq = p.G / 8;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i zi = _mm512_setzero_si512();
  const __m512 zf = _mm512_setzero_ps();
  FMK_I4_DECL(0) FMK_I4_DECL(1) FMK_I4_DECL(2) FMK_I4_DECL(3)
  for (int64_t g = 0; g < p.ngroups; ++g) {
    FMK_I4_ZERO(0) FMK_I4_ZERO(1) FMK_I4_ZERO(2) FMK_I4_ZERO(3)
    for (int64_t t = g * gq; t < (g + 1) * gq; ++t) {
      FMK_I4_COL(0) FMK_I4_COL(1) FMK_I4_COL(2)
    }
    FMK_I4_EPICOL(0) FMK_I4_EPICOL(1) FMK_I4_EPICOL(2)
  }
  FMK_I4_STORE(0, 0) FMK_I4_STORE(0, 1) FMK_I4_STORE(0, 2) FMK_I4_STORE(1, 0) FMK_I4_STORE(1, 1) FMK_I4_STORE(1, 2)
  FMK_I4_STORE(2, 0) FMK_I4_STORE(2, 1) FMK_I4_STORE(2, 2) FMK_I4_STORE(3, 0) FMK_I4_STORE(3, 1) FMK_I4_STORE(3, 2)
}

// Scalar path (portable and AVX2-targeted copies): same math, one 16-column block, rows [m0, m1).
inline void int4_scalar_body(const Int4Args& p, int64_t m0, int64_t m1, int64_t b) {
  const int64_t ldb = (p.K / 8) * 64;
  const uint8_t* B = p.B + b * ldb;
  for (int64_t m = m0; m < m1; ++m) {
    float accf[16] = {0};
    const int8_t* a = p.A + m * p.K;
    for (int64_t g = 0; g < p.ngroups; ++g) {
      int32_t acc[16] = {0};
      for (int64_t t = g * p.G / 8; t < (g + 1) * p.G / 8; ++t) {
        const uint8_t* bb = B + t * 64;
        for (int nn = 0; nn < 16; ++nn)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = bb[nn * 4 + j];
            acc[nn] += static_cast<int32_t>(byte & 0xF) * a[8 * t + j] + static_cast<int32_t>(byte >> 4) * a[8 * t + 4 + j];
          }
      }
      const float as = static_cast<float>(p.asum[m * p.ngroups + g]);
      for (int nn = 0; nn < 16; ++nn) {
        const int64_t n = b * 16 + nn;
        accf[nn] += p.scale[g * p.Np + n] * (static_cast<float>(acc[nn]) - p.zero[g * p.Np + n] * as);
      }
    }
    for (int nn = 0; nn < 16 && b * 16 + nn < p.N; ++nn) p.C[m * p.N + b * 16 + nn] = accf[nn] * p.a_scale[m];
  }
}

void int4_portable(const Int4Args& p, int64_t m0, int64_t m1, int64_t b) { int4_scalar_body(p, m0, m1, b); }
FMK_AVX2 void int4_avx2(const Int4Args& p, int64_t m0, int64_t m1, int64_t b) { int4_scalar_body(p, m0, m1, b); }

using Int4Kernel = void (*)(const Int4Args&, int64_t, int64_t);

template <int MR>
constexpr std::array<Int4Kernel, kNB> int4_row() {
  return {&ukernel_int4<MR, 1>, &ukernel_int4<MR, 2>, &ukernel_int4<MR, 3>};
}

Int4Kernel pick_int4(int mr, int nb) {
  static const std::array<std::array<Int4Kernel, kNB>, kMR> t = {int4_row<1>(), int4_row<2>(), int4_row<3>(),
                                                                 int4_row<4>()};
  return t[mr - 1][nb - 1];
}

void int4_gemm(const Int4Args& p, int64_t R) {
  const bool avx2 = use_avx2();
  quant::weight_panel_gemm(
      R, p.Np / 16, kNB, kMR, use_avx512_vnni(),
      [&](int64_t m, int rows, int64_t b0, int nb) { pick_int4(rows, nb)(p, m, b0); },
      [&](int64_t mb, int64_t me, int64_t b) { (avx2 ? int4_avx2 : int4_portable)(p, mb, me, b); });
}

// ---------------------------------------------------------------- ops

at::Tensor int4_pack_weight_cpu(const at::Tensor& q_in) {
  const char* op = "fmkernels::int4_pack_weight";
  TORCH_CHECK(q_in.scalar_type() == at::kByte && q_in.dim() == 2, op,
              ": q must be a 2-D uint8 tensor (N, K) of values 0..15, got ", q_in.scalar_type(), " ", q_in.sizes());
  TORCH_CHECK(q_in.size(1) % 8 == 0, op, ": K must be a multiple of 8, got ", q_in.size(1));
  const at::Tensor q = q_in.contiguous();
  const int64_t N = q.size(0), K = q.size(1), Np = round_up(std::max<int64_t>(N, 1), 16);
  at::Tensor out = at::empty({Np / 16, K / 8, 16, 4}, q.options());
  const uint8_t* src = q.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, Np / 16, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < K / 8; ++t)
        for (int nn = 0; nn < 16; ++nn) {
          const int64_t n = b * 16 + nn;
          for (int j = 0; j < 4; ++j) {
            const uint8_t lo = n < N ? (src[n * K + 8 * t + j] & 0xF) : 0;
            const uint8_t hi = n < N ? (src[n * K + 8 * t + 4 + j] & 0xF) : 0;
            dst[((b * (K / 8) + t) * 16 + nn) * 4 + j] = static_cast<uint8_t>(lo | (hi << 4));
          }
        }
  });
  return out;
}

at::Tensor int4_mm_cpu(const at::Tensor& x_in, const at::Tensor& wp, const at::Tensor& scale_in,
                       const at::Tensor& zero_in, int64_t group_size, int64_t n_out,
                       const std::optional<at::Tensor>& bias, int64_t act_terms) {
  const char* op = "fmkernels::int4_mm";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (M, K), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16 ||
                  x_in.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x_in.scalar_type());
  TORCH_CHECK(wp.scalar_type() == at::kByte && wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 4 &&
                  wp.is_contiguous(),
              op, ": w_packed must be contiguous uint8 (N/16, K/8, 16, 4) from int4_pack_weight, got ",
              wp.scalar_type(), " ", wp.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = n_out, Np = wp.size(0) * 16;
  TORCH_CHECK(wp.size(1) * 8 == K, op, ": w_packed was packed for K=", wp.size(1) * 8, ", x has K=", K);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, op,
              ": group_size must be 32, 64, 128 or 256, got ", group_size);
  TORCH_CHECK(K % group_size == 0, op, ": K=", K, " is not a multiple of group_size=", group_size);
  TORCH_CHECK(N > Np - 16 && N <= Np, op, ": n=", N, " does not match w_packed (", Np, " padded columns)");
  const int64_t ngroups = K / group_size;
  TORCH_CHECK(scale_in.scalar_type() == at::kFloat && scale_in.dim() == 2 && scale_in.size(0) == ngroups &&
                  scale_in.size(1) == Np,
              op, ": scale must be float32 (", ngroups, ", ", Np, "), got ", scale_in.scalar_type(), " ",
              scale_in.sizes());
  TORCH_CHECK(zero_in.scalar_type() == at::kFloat && zero_in.sizes() == scale_in.sizes(), op,
              ": zero must be float32 with scale's shape ", scale_in.sizes(), ", got ", zero_in.scalar_type(), " ",
              zero_in.sizes());
  TORCH_CHECK(act_terms == 1 || act_terms == 2, op, ": act_terms must be 1 or 2, got ", act_terms);
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ", bias->sizes());
  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), zero = zero_in.contiguous();
  const int64_t R = M * act_terms;
  at::Tensor codes = at::empty({R, K}, x.options().dtype(at::kChar));
  at::Tensor a_scale = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor asum = at::empty({R, ngroups}, x.options().dtype(at::kInt));
  at::Tensor C = at::empty({R, N}, x.options().dtype(at::kFloat));
  const bool avx512 = use_avx512();
  uint8_t* cp = reinterpret_cast<uint8_t*>(codes.data_ptr<int8_t>());
  float* asp = a_scale.data_ptr<float>();
  int32_t* sp = asum.data_ptr<int32_t>();
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int4_mm_quant", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* hi = cp + r * act_terms * K;
        uint8_t* lo = act_terms == 2 ? hi + K : nullptr;
        asp[r * act_terms] = quant::quant_row(avx512, xp + r * K, K, hi, 0, lo, act_terms == 2 ? &asp[r * 2 + 1] : nullptr);
        for (int64_t t = 0; t < act_terms; ++t) {
          const int8_t* c = reinterpret_cast<const int8_t*>(hi + t * K);
          for (int64_t g = 0; g < ngroups; ++g) {
            int32_t s = 0;
            for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) s += c[k];
            sp[(r * act_terms + t) * ngroups + g] = s;
          }
        }
      }
    });
  });
  Int4Args p{codes.data_ptr<int8_t>(), asp, sp, wp.data_ptr<uint8_t>(), scale.data_ptr<float>(),
             zero.data_ptr<float>(), C.data_ptr<float>(), K, N, Np, group_size, ngroups};
  int4_gemm(p, R);
  // sum the activation terms, add bias, convert
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  const float* Cp = C.data_ptr<float>();
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int4_mm_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t n = 0; n < N; ++n) {
          float v = Cp[r * act_terms * N + n];
          if (act_terms == 2) v += Cp[(r * 2 + 1) * N + n];
          if (bp) v += bp[n];
          o[r * N + n] = static_cast<scalar_t>(v);
        }
    });
  });
  return out;
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) {
  m.impl("int4_pack_weight", &fmk::cpu::int4_pack_weight_cpu);
  m.impl("int4_mm", &fmk::cpu::int4_mm_cpu);
}
