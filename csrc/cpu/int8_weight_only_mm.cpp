// int8 weight-only GEMM: out = x @ dequant(W)^T (+ bias), W int8 with group-wise (or per-channel) scales along K:
//   W[n, k] = (u[n, k] - 128) * scale[g, n],  g = k / group_size,  u = w + 128 in [1, 255] (uint8).
//
// Packed layout ("wo8", int8_weight_only_pack in fmkernels/reference/quant.py): Wp[Np/16][K/4][16][4] bytes,
// Wp[b, t, i, j] = u[16 b + i, 4 t + j]: one 64-byte load is one VNNI k-step (4 k) for 16 columns.
// scale (K/G, Np) fp32; per-channel is one group (G = K). Padding (rows n >= N, columns k >= real K) holds u = 128.
// Compute (AVX-512 VNNI): activations quantized per row on the fly in two int8 terms hi + lo/254 (~15-bit, the
// int4 kernel's "A16" mode); per group, int32-exact:
//   acc = sum_k u * a  (vpdpbusd: weight bytes are the u8 operand, activation codes the s8 broadcast operand)
//   y  += scale * (acc - 128 * sum_k a)
// Micro-kernel: 4 rows x 48 columns (12 int32 + 12 fp32 zmm accumulators), or 2 rows x 64 columns when R <= 2;
// parallel over column panels. M <= 3 with VNNI takes the GEMV path below instead.
// The weights stream once per 4 activation rows: at M = 1 (two rows of codes) the kernel reads 1 byte per weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "cpu/quant_common.h"
#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

using quant::round_up;

constexpr int kMR = 4;
constexpr int kNB = 4;  // 16-column blocks per micro-kernel: 4 when R <= 2 (GEMV), else 3 (register budget)

struct Wo8Args {
  const int8_t* A;       // (R, K) signed activation codes, R = M * 2
  const float* a_scale;  // (R,)
  const int32_t* asum;   // (R, ngroups) per-group sums of the codes
  const uint8_t* B;      // packed weights
  const float* scale;    // (ngroups, Np)
  float* C;              // (R, N) fp32, = (x_term @ W^T) * a_scale
  int64_t K, N, Np, G, ngroups;
};

#define FMK_W8_DPB(c, b, p) __asm__("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(c) : "m"(*(const int32_t*)(p)), "v"(b))
#define FMK_W8_DECL(i) __m512i c##i##0, c##i##1, c##i##2, c##i##3; __m512 f##i##0 = zf, f##i##1 = zf, f##i##2 = zf, f##i##3 = zf;
#define FMK_W8_ZERO(i) c##i##0 = zi; c##i##1 = zi; c##i##2 = zi; c##i##3 = zi;
#define FMK_W8_DP(i, j)                                 \
  if constexpr (MR > i) {                               \
    FMK_W8_DPB(c##i##j, v, p.A + (m0 + i) * p.K + 4 * t); \
  }
#define FMK_W8_COL(j)                                               \
  if constexpr (NB > j) {                                           \
    const __m512i v = _mm512_loadu_si512(B + j * ldb + t * 64);     \
    FMK_W8_DP(0, j) FMK_W8_DP(1, j) FMK_W8_DP(2, j) FMK_W8_DP(3, j) \
  }
#define FMK_W8_EPI(i, j)                                                                                  \
  if constexpr (MR > i) {                                                                                 \
    const __m512i as = _mm512_set1_epi32(128 * p.asum[(m0 + i) * p.ngroups + g]);                         \
    f##i##j = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(c##i##j, as)), f##i##j);             \
  }
#define FMK_W8_EPICOL(j)                                                \
  if constexpr (NB > j) {                                               \
    const __m512 s = _mm512_loadu_ps(p.scale + g * p.Np + n0 + 16 * j); \
    FMK_W8_EPI(0, j) FMK_W8_EPI(1, j) FMK_W8_EPI(2, j) FMK_W8_EPI(3, j) \
  }
#define FMK_W8_STORE(i, j)                                                              \
  if constexpr (MR > i && NB > j) {                                                     \
    const int64_t n = n0 + 16 * j;                                                      \
    if (n < p.N)                                                                        \
      _mm512_mask_storeu_ps(p.C + (m0 + i) * p.N + n, tail_mask(p.N - n),               \
                            _mm512_mul_ps(f##i##j, _mm512_set1_ps(p.a_scale[m0 + i]))); \
  }

template <int MR, int NB>
FMK_AVX512_VNNI void ukernel_wo8(const Wo8Args& p, int64_t m0, int64_t b0) {
  const int64_t ldb = (p.K / 4) * 64;
  const uint8_t* B = p.B + b0 * ldb;
  const int64_t n0 = b0 * 16;
  const int64_t gq = p.G / 4;
  const __m512i zi = _mm512_setzero_si512();
  const __m512 zf = _mm512_setzero_ps();
  FMK_W8_DECL(0) FMK_W8_DECL(1) FMK_W8_DECL(2) FMK_W8_DECL(3)
  for (int64_t g = 0; g < p.ngroups; ++g) {
    FMK_W8_ZERO(0) FMK_W8_ZERO(1) FMK_W8_ZERO(2) FMK_W8_ZERO(3)
    for (int64_t t = g * gq; t < (g + 1) * gq; ++t) {
      FMK_W8_COL(0) FMK_W8_COL(1) FMK_W8_COL(2) FMK_W8_COL(3)
    }
    FMK_W8_EPICOL(0) FMK_W8_EPICOL(1) FMK_W8_EPICOL(2) FMK_W8_EPICOL(3)
  }
  FMK_W8_STORE(0, 0) FMK_W8_STORE(0, 1) FMK_W8_STORE(0, 2) FMK_W8_STORE(1, 0) FMK_W8_STORE(1, 1) FMK_W8_STORE(1, 2)
  FMK_W8_STORE(2, 0) FMK_W8_STORE(2, 1) FMK_W8_STORE(2, 2) FMK_W8_STORE(3, 0) FMK_W8_STORE(3, 1) FMK_W8_STORE(3, 2)
  FMK_W8_STORE(0, 3) FMK_W8_STORE(1, 3) FMK_W8_STORE(2, 3) FMK_W8_STORE(3, 3)
}

// Scalar path (portable and AVX2-targeted copies): same math, one 16-column block, rows [m0, m1).
inline void wo8_scalar_body(const Wo8Args& p, int64_t m0, int64_t m1, int64_t b) {
  const int64_t ldb = (p.K / 4) * 64;
  const uint8_t* B = p.B + b * ldb;
  for (int64_t m = m0; m < m1; ++m) {
    float accf[16] = {0};
    const int8_t* a = p.A + m * p.K;
    for (int64_t g = 0; g < p.ngroups; ++g) {
      int32_t acc[16] = {0};
      for (int64_t t = g * p.G / 4; t < (g + 1) * p.G / 4; ++t) {
        const uint8_t* bb = B + t * 64;
        for (int nn = 0; nn < 16; ++nn)
          for (int j = 0; j < 4; ++j) acc[nn] += static_cast<int32_t>(bb[nn * 4 + j]) * a[4 * t + j];
      }
      const int32_t as = 128 * p.asum[m * p.ngroups + g];
      for (int nn = 0; nn < 16; ++nn)
        accf[nn] += p.scale[g * p.Np + b * 16 + nn] * static_cast<float>(acc[nn] - as);
    }
    for (int nn = 0; nn < 16 && b * 16 + nn < p.N; ++nn) p.C[m * p.N + b * 16 + nn] = accf[nn] * p.a_scale[m];
  }
}

void wo8_portable(const Wo8Args& p, int64_t m0, int64_t m1, int64_t b) { wo8_scalar_body(p, m0, m1, b); }
FMK_AVX2 void wo8_avx2(const Wo8Args& p, int64_t m0, int64_t m1, int64_t b) { wo8_scalar_body(p, m0, m1, b); }

using Wo8Kernel = void (*)(const Wo8Args&, int64_t, int64_t);

template <int MR>
constexpr std::array<Wo8Kernel, kNB> wo8_row() {
  return {&ukernel_wo8<MR, 1>, &ukernel_wo8<MR, 2>, &ukernel_wo8<MR, 3>, &ukernel_wo8<MR, 4>};
}

Wo8Kernel pick_wo8(int mr, int nb) {
  static const std::array<std::array<Wo8Kernel, kNB>, kMR> t = {wo8_row<1>(), wo8_row<2>(), wo8_row<3>(),
                                                                wo8_row<4>()};
  return t[mr - 1][nb - 1];
}

void wo8_gemm(const Wo8Args& p, int64_t R) {
  const int64_t NB = R <= 2 ? kNB : kNB - 1;  // MR x NB x 2 accumulators within 32 zmm
  const bool avx2 = use_avx2();
  quant::weight_panel_gemm(
      R, p.Np / 16, NB, kMR, use_avx512_vnni(),
      [&](int64_t m, int rows, int64_t b0, int nb) { pick_wo8(rows, nb)(p, m, b0); },
      [&](int64_t mb, int64_t me, int64_t b) { (avx2 ? wo8_avx2 : wo8_portable)(p, mb, me, b); });
}

// ---------------------------------------------------------------- GEMV path (M <= kGemvMaxM, AVX-512 VNNI)
// Decode (M = 1) should run at the speed of reading the weight bytes. The panel micro-kernel above feeds vpdpbusd
// its activation operand as an embedded {1to16} broadcast from memory; on the Zen 4 VM that form caps an L2-resident
// GEMV loop at ~42 GB/s per core, against ~100-117 GB/s for a plain AVX-512 read of the same bytes (microbenchmark,
// 256 KB-1 MB); explicit vpbroadcastd loads are as slow. Register operands run at the read speed, so here each
// row's codes for 16 k-steps sit in one zmm and vpermd (index register + 1 per step) broadcasts step u's 4 bytes:
// R vpermd + R x NB vpdpbusd per NB 64-byte weight loads, NB 16-column blocks (NB contiguous K * 16-byte streams
// of the wo8 layout) in step. Per group: fp32 += scale * (acc - 128 * asum); at the end out = f_hi * a_hi +
// f_lo * a_lo (+ bias), stored in x's dtype, so no (R, N) fp32 scratch and no combine pass. Threads take contiguous
// runs of 4-block panels. Activation codes, scales and group sums live in thread-local scratch (no allocation
// after the first call). Same ~15-bit two-term activations as the panel path.
// Measured (Zen 4 VM, loaded, 1 thread, 1024 x 1024 weights in L2, the op without Python, best of 1000): M = 1
// 16.5 us against 13.3 us for torch.amax of the packed bytes and 18.3 us for the panel path (with its four
// allocations and combine pass); M = 2 / 3 5-8% faster than the panel path; M = 4 equal, so M >= 4 keeps it.
constexpr int64_t kGemvMaxM = 3;

// Sum of signed int8 codes c[0, n) (sad on c ^ 0x80, then - 128 n).
FMK_AVX512 inline int32_t sum_codes_avx512(const int8_t* c, int64_t n) {
  __m512i acc = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < n; k += 64) {
    const int64_t left = n - k;
    const __mmask64 m = left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
    const __m512i u = _mm512_maskz_mov_epi8(m, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, c + k), flip));
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(u, _mm512_setzero_si512()));
  }
  return static_cast<int32_t>(_mm512_reduce_add_epi64(acc) - 128 * n);
}

// R activation-code rows x NB 16-column blocks [b, b + NB): NB contiguous K * 16-byte streams read in step, each
// 64-byte load feeding R vpdpbusd against register broadcasts (vpermd of the row's 16-step code register; R x NB
// independent int32 accumulators). Epilogue per group: fp32 += scale * (acc - 128 * asum); at the end
// out[m, n] = f_hi * a_hi + f_lo * a_lo (+ bias), stored in x's dtype.
template <int R, int NB, typename scalar_t>
FMK_AVX512_VNNI void gemv_wo8_panel(const Wo8Args& p, int64_t b, scalar_t* out, const float* bias) {
  const int64_t ldb = (p.K / 4) * 64;
  const int64_t gq = p.G / 4;
  const uint8_t* B = p.B + b * ldb;
  __m512 f[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) f[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ngroups; ++g) {
    __m512i acc[R][NB];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
    const int8_t* A = p.A + 4 * g * gq;
    const uint8_t* Bt = B + g * gq * 64;
    for (int64_t t0 = 0; t0 < gq; t0 += 16) {
      // 16 k-steps of each row's codes in one register; step u's 4 bytes go to all lanes with vpermd
      const int64_t nt = std::min<int64_t>(16, gq - t0);
      __m512i a[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] = _mm512_maskz_loadu_epi32(tail_mask(nt), A + r * p.K + 4 * t0);
      __m512i idx = _mm512_setzero_si512();
      const __m512i one = _mm512_set1_epi32(1);
      const uint8_t* bp = Bt + t0 * 64;
#define FMK_WO8_GEMV_STEP                                                                          \
  {                                                                                                \
    __m512i x[R];                                                                                  \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) x[r] = _mm512_permutexvar_epi32(idx, a[r]); \
    idx = _mm512_add_epi32(idx, one);                                                              \
    _Pragma("GCC unroll 8") for (int j = 0; j < NB; ++j) {                                         \
      const __m512i w = _mm512_loadu_si512(bp + j * ldb);                                          \
      _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) acc[r][j] =                              \
          _mm512_dpbusd_epi32(acc[r][j], w, x[r]);                                                 \
    }                                                                                              \
    bp += 64;                                                                                      \
  }
      if (nt == 16) {
#pragma GCC unroll 16
        for (int u = 0; u < 16; ++u) FMK_WO8_GEMV_STEP
      } else {
        for (int64_t u = 0; u < nt; ++u) FMK_WO8_GEMV_STEP
      }
#undef FMK_WO8_GEMV_STEP
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __m512 s = _mm512_loadu_ps(p.scale + g * p.Np + (b + j) * 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i a = _mm512_sub_epi32(acc[r][j], _mm512_set1_epi32(128 * p.asum[r * p.ngroups + g]));
        f[r][j] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(a), f[r][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) {
    const int64_t n = (b + j) * 16;
    if (n >= p.N) break;
    const __mmask16 mask = tail_mask(p.N - n);
#pragma GCC unroll 4
    for (int m = 0; m < R / 2; ++m) {
      // same rounding order as the M > kGemvMaxM path: (f_hi * a_hi) + (f_lo * a_lo) + bias
      __m512 v = _mm512_add_ps(_mm512_mul_ps(f[2 * m][j], _mm512_set1_ps(p.a_scale[2 * m])),
                               _mm512_mul_ps(f[2 * m + 1][j], _mm512_set1_ps(p.a_scale[2 * m + 1])));
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n));
      store16(out + m * p.N + n, v, mask);
    }
  }
}

template <int R, int NB, typename scalar_t>
void gemv_wo8_range(const Wo8Args& p, int64_t b0, int64_t b1, scalar_t* out, const float* bias) {
  int64_t b = b0;
  for (; b + NB <= b1; b += NB) gemv_wo8_panel<R, NB, scalar_t>(p, b, out, bias);
  for (; b < b1; ++b) gemv_wo8_panel<R, 1, scalar_t>(p, b, out, bias);
}

// out (M, N) = x (M, K) @ W^T + bias for M <= kGemvMaxM; requires use_avx512_vnni().
template <typename scalar_t>
void wo8_gemv(const scalar_t* x, int64_t M, const Wo8Args& w, scalar_t* out, const float* bias) {
  constexpr int64_t terms = 2;
  const int64_t K = w.K, R = M * terms;
  // thread-local scratch: R rows of codes, R scales, R x ngroups group sums
  thread_local std::vector<int8_t> codes;
  thread_local std::vector<float> a_scale;
  thread_local std::vector<int32_t> asum;
  if (static_cast<int64_t>(codes.size()) < R * K) codes.resize(R * K);
  if (static_cast<int64_t>(a_scale.size()) < R) a_scale.resize(R);
  if (static_cast<int64_t>(asum.size()) < R * w.ngroups) asum.resize(R * w.ngroups);
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* hi = reinterpret_cast<uint8_t*>(codes.data()) + m * terms * K;
    a_scale[m * terms] = quant::quant_row(true, x + m * K, K, hi, 0, hi + K, &a_scale[m * terms + 1]);
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < w.ngroups; ++g)
      asum[r * w.ngroups + g] = sum_codes_avx512(codes.data() + r * K + g * w.G, w.G);
  Wo8Args p = w;
  p.A = codes.data();
  p.a_scale = a_scale.data();
  p.asum = asum.data();
  // R x NB accumulators + R code registers + R broadcasts + NB weights within 32 zmm. NB measured on the Zen 4 VM:
  // M = 1: 4 beats 2, 6, 8 (16.5 / 17.5 / 17.7 / 18.3 us, 1024 x 1024); M = 2: 3 beats 2; software prefetch
  // (1-4 KB ahead per stream) did not help. At M = 4 (R = 8) this path only matched the panel kernel.
  auto* kern = M == 1 ? &gemv_wo8_range<2, 4, scalar_t>
               : M == 2 ? &gemv_wo8_range<4, 3, scalar_t>
                        : &gemv_wo8_range<6, 2, scalar_t>;
  constexpr int64_t kPanel = 4;  // thread ranges in whole 4-block panels
  const int64_t nblk = w.Np / 16, npanel = (nblk + kPanel - 1) / kPanel;
  // contiguous panel ranges per thread; at least ~128 KB of weights per thread before a second one wakes
  const int64_t grain = std::max<int64_t>(1, (128 * 1024) / (kPanel * 16 * K));
  at::parallel_for(0, npanel, grain, [&](int64_t p0, int64_t p1) {
    kern(p, p0 * kPanel, std::min(nblk, p1 * kPanel), out, bias);
  });
}

at::Tensor int8_weight_only_mm_cpu(const at::Tensor& x_in, const at::Tensor& wp, const at::Tensor& scale_in,
                                   int64_t group_size, int64_t n_out, const std::optional<at::Tensor>& bias) {
  const char* op = "fmkernels::int8_weight_only_mm";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (M, K), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16 ||
                  x_in.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x_in.scalar_type());
  TORCH_CHECK(wp.scalar_type() == at::kByte && wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 4 &&
                  wp.is_contiguous(),
              op, ": w_packed must be contiguous uint8 (Np/16, K/4, 16, 4) from int8_weight_only_quantize, got ",
              wp.scalar_type(), " ", wp.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = n_out, Np = wp.size(0) * 16;
  TORCH_CHECK(wp.size(1) * 4 == K, op, ": w_packed was packed for K=", wp.size(1) * 4, ", x has K=", K);
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0 && K % group_size == 0 && group_size <= 65536, op,
              ": group_size must be a positive multiple of 4 that divides K=", K, " (at most 65536), got ", group_size);
  TORCH_CHECK(N > Np - 16 && N <= Np, op, ": n=", N, " does not match w_packed (", Np, " padded columns)");
  const int64_t ngroups = K / group_size;
  TORCH_CHECK(scale_in.scalar_type() == at::kFloat && scale_in.dim() == 2 && scale_in.size(0) == ngroups &&
                  scale_in.size(1) == Np,
              op, ": scale must be float32 (", ngroups, ", ", Np, "), got ", scale_in.scalar_type(), " ",
              scale_in.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ", bias->sizes());
  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  if (M <= kGemvMaxM && use_avx512_vnni()) {
    at::Tensor bias32;
    if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
    Wo8Args w{nullptr, nullptr, nullptr, wp.data_ptr<uint8_t>(), scale.data_ptr<float>(), nullptr,
              K, N, Np, group_size, ngroups};
    FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int8_weight_only_gemv", [&] {
      wo8_gemv(x.data_ptr<scalar_t>(), M, w, out.data_ptr<scalar_t>(),
               bias.has_value() ? bias32.data_ptr<float>() : nullptr);
    });
    return out;
  }
  constexpr int64_t terms = 2;
  const int64_t R = M * terms;
  at::Tensor codes = at::empty({R, K}, x.options().dtype(at::kChar));
  at::Tensor a_scale = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor asum = at::empty({R, ngroups}, x.options().dtype(at::kInt));
  at::Tensor C = at::empty({R, N}, x.options().dtype(at::kFloat));
  const bool avx512 = use_avx512();
  uint8_t* cp = reinterpret_cast<uint8_t*>(codes.data_ptr<int8_t>());
  float* asp = a_scale.data_ptr<float>();
  int32_t* sp = asum.data_ptr<int32_t>();
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int8_weight_only_mm_quant", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* hi = cp + r * terms * K;
        asp[r * terms] = quant::quant_row(avx512, xp + r * K, K, hi, 0, hi + K, &asp[r * terms + 1]);
        for (int64_t t = 0; t < terms; ++t) {
          const int8_t* c = reinterpret_cast<const int8_t*>(hi + t * K);
          for (int64_t g = 0; g < ngroups; ++g) {
            int32_t s = 0;
            for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) s += c[k];
            sp[(r * terms + t) * ngroups + g] = s;
          }
        }
      }
    });
  });
  Wo8Args p{codes.data_ptr<int8_t>(), asp, sp, wp.data_ptr<uint8_t>(), scale.data_ptr<float>(), C.data_ptr<float>(),
            K, N, Np, group_size, ngroups};
  wo8_gemm(p, R);
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  const float* Cp = C.data_ptr<float>();
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int8_weight_only_mm_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t n = 0; n < N; ++n) {
          float v = Cp[r * terms * N + n] + Cp[(r * terms + 1) * N + n];
          if (bp) v += bp[n];
          o[r * N + n] = static_cast<scalar_t>(v);
        }
    });
  });
  return out;
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) { m.impl("int8_weight_only_mm", &fmk::cpu::int8_weight_only_mm_cpu); }
