// int8 x int8 -> int32 GEMM with a fused dequantizing epilogue, and dynamic per-row activation quantization.
//
//   out[m, n] = (sum_k A[m, k] * B[n, k]) * a_scale[m] * b_scale[n] (+ bias[n])     (exact int32 sum)
//
// B is prepacked once (int8_pack_weight) into the VNNI layout  Bp[N/16][K/4][16][4]  (N padded to 16, K to 4,
// zeros), so one 64-byte load holds 4 consecutive k of 16 consecutive n: the s8 operand of vpdpbusd.
// vpdpbusd multiplies u8 x s8. The weights are the u8 operand (B + 128: one vpxord per 64-byte load) and the
// activations the s8 operand, read straight from memory as an embedded {1to16} broadcast; the epilogue subtracts
// 128 * sum_k A[m, k] (the signed/unsigned correction, computed with the activation pass). comp[n] =
// 128 * sum_k B[n, k] (part of the packed format) serves kernels that shift the activations instead.
// (Measured on Zen 4: the embedded-broadcast form runs at the reg-reg vpdpbusd peak, the xor is free; activations
// as u8 via vpbroadcastd + register operand ran at half that rate.)
// Micro-kernel: MR=6 rows x NR=64 columns of int32 accumulators (24 zmm), k stepped by 4; the 64 x K panel of
// B stays in L2 while all rows stream past it. Parallel over (N panel, M chunk) tiles.
// M = 1 (GEMV) is the same loop with MR = 1: it streams each weight byte once at the L3/DRAM read rate (16 MB
// int8 weight: 77 GB/s on one core, equal to a bare read loop over the same bytes); software prefetch made it
// slower (71 GB/s at 24 lines ahead), so there is none.
// Fallbacks: the same loops in plain C++ (portable, and compiled with an AVX2 target for auto-vectorization).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/quant_common.h"
#include "cpu/vec.h"

namespace fmk::cpu {
namespace {

using quant::round_up;

constexpr int kMR = 6;  // rows per micro-kernel
constexpr int kNB = 4;  // 16-column blocks per micro-kernel (NR = 64)


struct Epilogue {
  const int32_t* arow;    // (M,) 128 * rowsum(A): correction for the u8 weight operand; nullptr: none
  const float* a_scale;   // (M,) or nullptr (int32 output)
  const float* b_scale;   // (N,)
  const float* bias;      // (N,) or nullptr
  void* out;              // (M, N) row-major, ldo = N
  at::ScalarType out_type;
  int64_t N;
};

template <typename T>
FMK_AVX512 inline void store_row_avx512(const Epilogue& ep, int64_t m, int64_t n0, __m512i acc, __mmask16 mask) {
  const __m512i v = _mm512_sub_epi32(acc, _mm512_set1_epi32(ep.arow[m]));
  if constexpr (std::is_same_v<T, int32_t>) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(ep.out) + m * ep.N + n0, mask, v);
  } else {
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(ep.a_scale[m]));
    f = _mm512_mul_ps(f, _mm512_maskz_loadu_ps(mask, ep.b_scale + n0));
    if (ep.bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, ep.bias + n0));
    store16(static_cast<T*>(ep.out) + m * ep.N + n0, f, mask);
  }
}

// Accumulators are named variables, not an array: GCC keeps a 24-zmm array in memory (SRA size limit).
// The activation is the s8 operand, read as an embedded {1to16} broadcast memory operand (inline asm: GCC does
// not fold _mm512_set1_epi32 into it); measured 2x faster than vpbroadcastd + register operand here.
#define FMK_DPBUSD_BCAST(c, b, p) __asm__("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(c) : "m"(*(const int32_t*)(p)), "v"(b))
#define FMK_ROW_ACC(i) __m512i c##i##0 = z, c##i##1 = z, c##i##2 = z, c##i##3 = z;
#define FMK_ROW_DP(i)                                                   \
  if constexpr (MR > i) {                                               \
    const int8_t* ap = A + i * lda + 4 * k;                             \
    FMK_DPBUSD_BCAST(c##i##0, b0, ap);                                  \
    if constexpr (NB > 1) FMK_DPBUSD_BCAST(c##i##1, b1, ap);            \
    if constexpr (NB > 2) FMK_DPBUSD_BCAST(c##i##2, b2, ap);            \
    if constexpr (NB > 3) FMK_DPBUSD_BCAST(c##i##3, b3, ap);            \
  }
#define FMK_ROW_STORE(i)                                                                          \
  if constexpr (MR > i) {                                                                         \
    store_row_avx512<T>(ep, m0 + i, n0, c##i##0, tail_mask(ep.N - n0));                           \
    if constexpr (NB > 1) store_row_avx512<T>(ep, m0 + i, n0 + 16, c##i##1, tail_mask(ep.N - n0 - 16)); \
    if constexpr (NB > 2) store_row_avx512<T>(ep, m0 + i, n0 + 32, c##i##2, tail_mask(ep.N - n0 - 32)); \
    if constexpr (NB > 3) store_row_avx512<T>(ep, m0 + i, n0 + 48, c##i##3, tail_mask(ep.N - n0 - 48)); \
  }

// acc = sum_k (B + 128) * A  (B bytes XOR 0x80 = the u8 operand, A = the s8 broadcast operand)
template <typename T, int MR, int NB>
FMK_AVX512_VNNI void ukernel_vnni(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t kq,
                                  const Epilogue& ep, int64_t m0, int64_t n0) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  FMK_ROW_ACC(0) FMK_ROW_ACC(1) FMK_ROW_ACC(2) FMK_ROW_ACC(3) FMK_ROW_ACC(4) FMK_ROW_ACC(5)
  const int8_t* B1 = B + ldb;
  const int8_t* B2 = B + 2 * ldb;
  const int8_t* B3 = B + 3 * ldb;
  // MR >= 3: write-prefetch this tile's output lines (the epilogue's stores then do not wait on RFOs) and pull the
  // next row block's activations in over the k loop (they come from L3: every row block starts cold otherwise);
  // 2048^3 int32 out, 1 thread: 430 -> 447 GOPS per CPU-second (vpdpbusd peak 465), K = 4096: 441 -> 447.
  const int8_t* An = A + MR * lda;  // prefetches never fault past the end
  int pr = 0;
  int64_t po = 0;
  if constexpr (MR >= 3) {
    {
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NB; ++j)
          __builtin_prefetch(static_cast<const T*>(ep.out) + (m0 + i) * ep.N + n0 + 16 * j, 1, 3);
    }
  }
  for (int64_t k = 0; k < kq; ++k) {
    if constexpr (MR >= 3) {
      if ((k & 1) == 0 && po < 4 * kq) {
        _mm_prefetch(reinterpret_cast<const char*>(An + pr * lda + po), _MM_HINT_T0);
        if (++pr == MR) pr = 0, po += 64;
      }
    }
    const __m512i b0 = _mm512_xor_si512(_mm512_loadu_si512(B + k * 64), flip);
    const __m512i b1 = NB > 1 ? _mm512_xor_si512(_mm512_loadu_si512(B1 + k * 64), flip) : z;
    const __m512i b2 = NB > 2 ? _mm512_xor_si512(_mm512_loadu_si512(B2 + k * 64), flip) : z;
    const __m512i b3 = NB > 3 ? _mm512_xor_si512(_mm512_loadu_si512(B3 + k * 64), flip) : z;
    FMK_ROW_DP(0) FMK_ROW_DP(1) FMK_ROW_DP(2) FMK_ROW_DP(3) FMK_ROW_DP(4) FMK_ROW_DP(5)
  }
  FMK_ROW_STORE(0) FMK_ROW_STORE(1) FMK_ROW_STORE(2) FMK_ROW_STORE(3) FMK_ROW_STORE(4) FMK_ROW_STORE(5)
}
#undef FMK_ROW_ACC
#undef FMK_ROW_DP
#undef FMK_ROW_STORE

// Scalar kernel on the same packed layout (portable; and an AVX2-targeted copy the compiler vectorizes).
template <typename T>
inline void store_scalar(const Epilogue& ep, int64_t m, int64_t n, int32_t acc) {
  const int32_t v = acc - (ep.arow ? ep.arow[m] : 0);
  if constexpr (std::is_same_v<T, int32_t>) {
    static_cast<int32_t*>(ep.out)[m * ep.N + n] = v;
  } else {
    float f = static_cast<float>(v) * ep.a_scale[m];
    f = f * ep.b_scale[n];
    if (ep.bias) f = f + ep.bias[n];
    static_cast<T*>(ep.out)[m * ep.N + n] = static_cast<T>(f);
  }
}

template <typename T>
inline void kernel_scalar_body(const int8_t* A, int64_t lda, const int8_t* B, int64_t kq, const Epilogue& ep,
                               int64_t m0, int64_t m1, int64_t n0) {
  // one 16-column block, s8 x s8 (no correction needed)
  for (int64_t m = m0; m < m1; ++m) {
    int32_t acc[16] = {0};
    const int8_t* a = A + m * lda;
    for (int64_t k = 0; k < kq; ++k) {
      const int8_t* b = B + k * 64;
      for (int nn = 0; nn < 16; ++nn) {
        int32_t s = 0;
        for (int j = 0; j < 4; ++j) s += static_cast<int32_t>(a[4 * k + j]) * static_cast<int32_t>(b[nn * 4 + j]);
        acc[nn] += s;
      }
    }
    for (int nn = 0; nn < 16 && n0 + nn < ep.N; ++nn) store_scalar<T>(ep, m, n0 + nn, acc[nn]);
  }
}

template <typename T>
void kernel_portable(const int8_t* A, int64_t lda, const int8_t* B, int64_t kq, const Epilogue& ep, int64_t m0,
                     int64_t m1, int64_t n0) {
  kernel_scalar_body<T>(A, lda, B, kq, ep, m0, m1, n0);
}

template <typename T>
FMK_AVX2 void kernel_avx2(const int8_t* A, int64_t lda, const int8_t* B, int64_t kq, const Epilogue& ep, int64_t m0,
                          int64_t m1, int64_t n0) {
  kernel_scalar_body<T>(A, lda, B, kq, ep, m0, m1, n0);
}

template <typename T>
using UKernel = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, const Epilogue&, int64_t, int64_t);

template <typename T, int MR>
constexpr std::array<UKernel<T>, kNB> row_table() {
  return {&ukernel_vnni<T, MR, 1>, &ukernel_vnni<T, MR, 2>, &ukernel_vnni<T, MR, 3>, &ukernel_vnni<T, MR, 4>};
}

template <typename T>
UKernel<T> pick_ukernel(int mr, int nb) {
  static const std::array<std::array<UKernel<T>, kNB>, kMR> table = {
      row_table<T, 1>(), row_table<T, 2>(), row_table<T, 3>(), row_table<T, 4>(), row_table<T, 5>(), row_table<T, 6>()};
  return table[mr - 1][nb - 1];
}

// The GEMM driver. A: (M, lda) s8 codes, rows readable up to Kp (multiple of 4; pad bytes hit zero weights).
// ep.arow must hold 128 * rowsum(A) for the VNNI path (set to nullptr here for the scalar path).
template <typename T>
void gemm_s8(const int8_t* A, int64_t M, int64_t lda, const int8_t* Bp, int64_t Np, int64_t Kp, const Epilogue& ep) {
  const int64_t kq = Kp / 4;
  const int64_t ldb = kq * 64;  // bytes between consecutive 16-column blocks
  const int64_t nblk16 = Np / 16;
  const int64_t npanel = (nblk16 + kNB - 1) / kNB;
  const int64_t nthr = at::get_num_threads();
  // Split M into chunks only when there are too few N panels to keep every thread busy.
  int64_t mchunks = 1;
  if (npanel < 4 * nthr && M > kMR) mchunks = std::min<int64_t>((M + kMR - 1) / kMR, (4 * nthr + npanel - 1) / npanel);
  const int64_t mstep = round_up((M + mchunks - 1) / mchunks, kMR);
  mchunks = (M + mstep - 1) / mstep;
  const bool vnni = use_avx512_vnni();
  const bool avx2 = use_avx2();
  at::parallel_for(0, npanel * mchunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / mchunks, mc = t % mchunks;
      const int64_t mb = mc * mstep, me = std::min(M, mb + mstep);
      const int64_t b0 = p * kNB;
      const int nb = static_cast<int>(std::min<int64_t>(kNB, nblk16 - b0));
      const int8_t* B = Bp + b0 * ldb;
      if (vnni) {
        for (int64_t m = mb; m < me; m += kMR) {  // B panel (64 x K) stays in L2 across the row blocks
          const int mr = static_cast<int>(std::min<int64_t>(kMR, me - m));
          pick_ukernel<T>(mr, nb)(A + m * lda, lda, B, ldb, kq, ep, m, b0 * 16);
        }
      } else {
        Epilogue eps = ep;
        eps.arow = nullptr;
        for (int j = 0; j < nb; ++j) {
          if (avx2)
            kernel_avx2<T>(A, lda, B + j * ldb, kq, eps, mb, me, (b0 + j) * 16);
          else
            kernel_portable<T>(A, lda, B + j * ldb, kq, eps, mb, me, (b0 + j) * 16);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- packing

void colsum_pack_rows(const int8_t* b, int64_t N, int64_t K, int64_t Kp, int8_t* out, int32_t* comp,
                                 int64_t nb0, int64_t nb1) {
  const int64_t kq = Kp / 4;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    int8_t* dst = out + nb * kq * 64;
    for (int nn = 0; nn < 16; ++nn) {
      const int64_t n = nb * 16 + nn;
      int32_t s = 0;
      for (int64_t k = 0; k < Kp; ++k) {
        const int8_t v = (n < N && k < K) ? b[n * K + k] : 0;
        dst[(k / 4) * 64 + nn * 4 + (k % 4)] = v;
        s += v;
      }
      comp[n] = 128 * s;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> int8_pack_weight_cpu(const at::Tensor& b_in) {
  TORCH_CHECK(b_in.scalar_type() == at::kChar && b_in.dim() == 2,
              "fmkernels::int8_pack_weight: b must be a 2-D int8 tensor (N, K), got ", b_in.scalar_type(), " ",
              b_in.sizes());
  const at::Tensor b = b_in.contiguous();
  const int64_t N = b.size(0), K = b.size(1);
  const int64_t Np = round_up(std::max<int64_t>(N, 1), 16), Kp = round_up(std::max<int64_t>(K, 1), 4);
  at::Tensor packed = at::empty({Np / 16, Kp / 4, 16, 4}, b.options());
  at::Tensor comp = at::empty({Np}, b.options().dtype(at::kInt));
  const int8_t* bp = b.data_ptr<int8_t>();
  int8_t* out = packed.data_ptr<int8_t>();
  int32_t* cp = comp.data_ptr<int32_t>();
  at::parallel_for(0, Np / 16, 4, [&](int64_t nb0, int64_t nb1) { colsum_pack_rows(bp, N, K, Kp, out, cp, nb0, nb1); });
  return {packed, comp};
}

// ---------------------------------------------------------------- ops

// sum_k a[k] of an s8 row, and (dst != nullptr) a copy into dst zero-padded to lda bytes
FMK_AVX512 int32_t copy_rowsum_avx512(const int8_t* a, int64_t K, int8_t* dst, int64_t lda) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), z = _mm512_setzero_si512();
  __m512i acc = z;  // 8 x u64 sums of a + 128 (vpsadbw)
  const int64_t end = dst ? lda : K;
  for (int64_t k = 0; k < end; k += 64) {
    const __mmask64 lm = k + 64 <= K ? ~__mmask64(0) : (k < K ? (~__mmask64(0) >> (64 - (K - k))) : 0);
    const __m512i v = _mm512_maskz_loadu_epi8(lm, a + k);
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_xor_si512(v, flip), z));
    if (dst) _mm512_mask_storeu_epi8(dst + k, k + 64 <= lda ? ~__mmask64(0) : (~__mmask64(0) >> (64 - (lda - k))), v);
  }
  // every lane (those beyond K loaded as 0) contributed a + 128
  const int64_t lanes = (end + 63) / 64 * 64;
  return static_cast<int32_t>(_mm512_reduce_add_epi64(acc) - 128 * lanes);
}

int32_t copy_rowsum(bool avx512, const int8_t* a, int64_t K, int8_t* dst, int64_t lda) {
  if (avx512) return copy_rowsum_avx512(a, K, dst, lda);
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += a[k];
  if (dst) {
    std::memcpy(dst, a, K);
    std::memset(dst + K, 0, lda - K);
  }
  return sum;
}

// Row stride of the activation codes: rows a multiple of 1 KiB apart put the micro-kernel's 6 row streams and
// its 4 weight streams (64 KiB apart for K = 4096) in the same L1 set (8 ways); 64 bytes of padding spread them.
int64_t row_stride(int64_t Kp, int64_t M) { return (M > 1 && Kp % 1024 == 0) ? Kp + 64 : Kp; }

void check_packed(const at::Tensor& a_or_x, const at::Tensor& bp, const at::Tensor& comp, const at::Tensor& b_scale,
                  const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(bp.scalar_type() == at::kChar && bp.dim() == 4 && bp.size(2) == 16 && bp.size(3) == 4, op,
              ": b_packed must be int8 of shape (N/16, K/4, 16, 4) from int8_pack_weight, got ", bp.scalar_type(), " ",
              bp.sizes());
  TORCH_CHECK(bp.is_contiguous(), op, ": b_packed must be contiguous");
  const int64_t K = a_or_x.size(1);
  TORCH_CHECK(bp.size(1) * 4 == round_up(std::max<int64_t>(K, 1), 4), op, ": b_packed was packed for K=",
              bp.size(1) * 4, " (padded) but the input has K=", K);
  TORCH_CHECK(comp.scalar_type() == at::kInt && comp.dim() == 1 && comp.size(0) == bp.size(0) * 16, op,
              ": b_comp must be int32 of shape (", bp.size(0) * 16, ",), got ", comp.scalar_type(), " ", comp.sizes());
  TORCH_CHECK(b_scale.scalar_type() == at::kFloat && b_scale.dim() == 1 && b_scale.size(0) <= bp.size(0) * 16 &&
                  b_scale.size(0) > bp.size(0) * 16 - 16,
              op, ": b_scale must be float32 (N,) matching b_packed, got ", b_scale.scalar_type(), " ",
              b_scale.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b_scale.size(0), op, ": bias must have shape (",
                b_scale.size(0), ",), got ", bias->sizes());
}

at::Tensor int8_mm_cpu(const at::Tensor& a_in, const at::Tensor& a_scale_in, const at::Tensor& bp,
                       const at::Tensor& comp, const at::Tensor& b_scale_in, const std::optional<at::Tensor>& bias,
                       at::ScalarType out_dtype) {
  const char* op = "fmkernels::int8_mm";
  TORCH_CHECK(a_in.scalar_type() == at::kChar && a_in.dim() == 2, op, ": a must be 2-D int8, got ",
              a_in.scalar_type(), " ", a_in.sizes());
  check_packed(a_in, bp, comp, b_scale_in, bias, op);
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_scale_in.size(0);
  const int64_t Np = bp.size(0) * 16, Kp = bp.size(1) * 4;
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf ||
                  out_dtype == at::kInt,
              op, ": out_dtype must be float32, bfloat16, float16 or int32, got ", out_dtype);
  at::Tensor out = at::empty({M, N}, a_in.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const at::Tensor a_scale = a_scale_in.to(at::kFloat).contiguous();
  const at::Tensor b_scale = b_scale_in.contiguous();
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  // s8 codes readable up to Kp per row (copied only when K is not a multiple of 4, or to break 4 KiB aliasing of
  // the row stride), and 128 * rowsum(A), in one pass over A
  const at::Tensor ac = a_in.contiguous();
  const int64_t lda = row_stride(Kp, M);
  const bool copy = !(K == Kp && lda == Kp);
  at::Tensor apad = copy ? at::empty({M, lda}, ac.options()) : ac;
  at::Tensor arow = at::empty({M}, a_in.options().dtype(at::kInt));
  const int8_t* src = ac.data_ptr<int8_t>();
  int8_t* dst = apad.data_ptr<int8_t>();
  const int8_t* A = dst;
  int32_t* ar = arow.data_ptr<int32_t>();
  const bool avx512 = use_avx512();
  at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      ar[r] = 128 * copy_rowsum(avx512, src + r * K, K, copy ? dst + r * lda : nullptr, lda);
  });
  Epilogue ep{ar, a_scale.data_ptr<float>(), b_scale.data_ptr<float>(),
              bias.has_value() ? bias32.data_ptr<float>() : nullptr, out.data_ptr(), out_dtype, N};
  const int8_t* B = bp.data_ptr<int8_t>();
  switch (out_dtype) {
    case at::kInt: gemm_s8<int32_t>(A, M, lda, B, Np, Kp, ep); break;
    case at::kBFloat16: gemm_s8<c10::BFloat16>(A, M, lda, B, Np, Kp, ep); break;
    case at::kHalf: gemm_s8<c10::Half>(A, M, lda, B, Np, Kp, ep); break;
    default: gemm_s8<float>(A, M, lda, B, Np, Kp, ep); break;
  }
  return out;
}

// Dynamic per-row quantization of a float matrix: (q int8 (M, K), scale fp32 (M,)).
std::tuple<at::Tensor, at::Tensor> quantize_per_row_cpu(const at::Tensor& x_in) {
  const char* op = "fmkernels::quantize_per_row";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D, got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  const bool avx512 = use_avx512();
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "quantize_per_row_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* qp = reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>());
    float* sp = s.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) sp[r] = quant::quant_row(avx512, xp + r * K, K, qp + r * K, 0);
    });
  });
  return {q, s};
}

// Int8Linear forward: per-token dynamic quantization (straight into u8 codes) + int8 GEMM, output in x.dtype.
at::Tensor int8_linear_cpu(const at::Tensor& x_in, const at::Tensor& bp, const at::Tensor& comp,
                           const at::Tensor& b_scale_in, const std::optional<at::Tensor>& bias) {
  const char* op = "fmkernels::int8_linear";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (M, K), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16 ||
                  x_in.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x_in.scalar_type());
  check_packed(x_in, bp, comp, b_scale_in, bias, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = b_scale_in.size(0);
  const int64_t Np = bp.size(0) * 16, Kp = bp.size(1) * 4;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor b_scale = b_scale_in.contiguous();
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  const int64_t lda = row_stride(Kp, M);
  at::Tensor codes = at::empty({M, lda}, x.options().dtype(at::kChar));
  at::Tensor a_scale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor arow = at::empty({M}, x.options().dtype(at::kInt));
  const bool avx512 = use_avx512();
  int8_t* A = codes.data_ptr<int8_t>();
  float* asp = a_scale.data_ptr<float>();
  int32_t* ar = arow.data_ptr<int32_t>();
  FMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int8_linear_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int8_t* q = A + r * lda;
        int32_t sum = 0;
        asp[r] = quant::quant_row(avx512, xp + r * K, K, reinterpret_cast<uint8_t*>(q), 0, nullptr, nullptr, &sum);
        for (int64_t k = K; k < Kp; ++k) q[k] = 0;
        ar[r] = 128 * sum;
      }
    });
    Epilogue ep{ar, asp, b_scale.data_ptr<float>(), bias.has_value() ? bias32.data_ptr<float>() : nullptr,
                out.data_ptr(), x.scalar_type(), N};
    gemm_s8<scalar_t>(A, M, lda, bp.data_ptr<int8_t>(), Np, Kp, ep);
  });
  return out;
}

}  // namespace
}  // namespace fmk::cpu

TORCH_LIBRARY_IMPL(fmkernels, CPU, m) {
  m.impl("int8_pack_weight", &fmk::cpu::int8_pack_weight_cpu);
  m.impl("int8_mm", &fmk::cpu::int8_mm_cpu);
  m.impl("quantize_per_row", &fmk::cpu::quantize_per_row_cpu);
  m.impl("int8_linear", &fmk::cpu::int8_linear_cpu);
}
