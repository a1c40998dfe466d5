// Flash attention forward/backward, CUDA (sm80+), toolkit headers only. FlashAttention-2 structure with an
// online softmax in log2 units and fp32 accumulation, written with warp shuffles (no tensor cores):
//  - forward: a block (4 warps) owns 16 query rows of one (batch, head); K/V tiles of 32 keys are staged in
//    shared memory as fp32; lane j scores key j of the tile, lanes then own head-dim columns for P V.
//  - backward: dK/dV kernel, a block owns 32 keys of one (batch, kv head) and loops over the query rows (and
//    the query heads of a GQA group) that see them; dQ kernel, a block owns 16 query rows and loops over their
//    key tiles. P is recomputed from lse; no atomics, so gradients are deterministic.
// Key tiles that a query block cannot see (causal / window) are skipped by the loop bounds.
// Varlen (AttnShape.cu_q / cu_k): grid z = the sequence; each block reads its rows from cu_seqlens and masks
// within its sequence (blocks past a shorter sequence return at once).
// Status: compile-checked for sm_80 / sm_90a; not yet run on a GPU in this project (no device was lent).
#include <cfloat>

#include "cuda/common.cuh"
#include "cuda/flash_attention.h"

namespace fmk::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16;  // query rows per block (fwd, dq): 4 per warp
constexpr int kKeys = 32;  // keys per tile (one per lane)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct MaskDev {
  int64_t nq, nk, off, left, right;
  __device__ __forceinline__ int64_t lo(int64_t i) const { return left < 0 ? 0 : max((int64_t)0, i + off - left); }
  __device__ __forceinline__ int64_t hi(int64_t i) const { return right < 0 ? nk : min(nk, i + off + right + 1); }
  __device__ __forceinline__ bool visible(int64_t i, int64_t j) const { return i < nq && j >= lo(i) && j < hi(i); }
  __device__ __forceinline__ int64_t qlo(int64_t j0) const { return right < 0 ? 0 : max((int64_t)0, j0 - off - right); }
  __device__ __forceinline__ int64_t qhi(int64_t j1) const { return left < 0 ? nq : min(nq, j1 - off + left); }
};

// The block's problem: its sequence's first query / key rows (q0, k0) and lengths; dense: 0, 0, Nq, Nk.
struct SeqDev {
  int64_t q0, k0, nq, nk;
};
__device__ __forceinline__ SeqDev seq_of(const AttnShape& s) {
  if (s.cu_q == nullptr) return SeqDev{0, 0, s.Nq, s.Nk};
  const int z = blockIdx.z;
  const int64_t q0 = s.cu_q[z], k0 = s.cu_k[z];
  return SeqDev{q0, k0, s.cu_q[z + 1] - q0, s.cu_k[z + 1] - k0};
}

__host__ __device__ inline MaskDev make_mask(const AttnShape& s, int64_t nq, int64_t nk) {
  return MaskDev{nq, nk, nk - nq, s.window_left, s.window_right};
}

// Stage rows [r0, r0 + n) (n <= cap) of a (N, D) slice with row stride ld into shared fp32 rows of stride lds;
// rows past `valid` are zero.
template <typename T>
__device__ __forceinline__ void stage(float* dst, int lds, const T* src, int64_t ld, int64_t r0, int n, int64_t valid,
                                      int D) {
  for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    dst[r * lds + d] = (r0 + r < valid) ? to_float(src[(r0 + r) * ld + d]) : 0.f;
  }
}

// ------------------------------------------------------------------ forward

template <typename T, int DC>  // DC = ceil(D / 32): head-dim columns per lane
__global__ void __launch_bounds__(kThreads) fwd_kernel(AttnShape s, const T* __restrict__ q, const T* __restrict__ k,
                                                       const T* __restrict__ v, T* __restrict__ out,
                                                       float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(s.D), ldk = D + 1;
  float* sQ = smem;                 // kRows x D
  float* sK = sQ + kRows * D;       // kKeys x (D + 1)
  float* sV = sK + kKeys * ldk;     // kKeys x D
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bh = blockIdx.y, b = bh / s.Hq, h = bh % s.Hq, hk = h / (s.Hq / s.Hkv);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const SeqDev sg = seq_of(s);
  if (r0 >= sg.nq) return;  // (varlen: a shorter sequence than the grid)
  const MaskDev mask = make_mask(s, sg.nq, sg.nk);
  const float c = s.scale * kLog2e;
  const T* qb = q + b * s.sq[0] + h * s.sq[1] + sg.q0 * s.sq[2];
  const T* kb = k + b * s.sk[0] + hk * s.sk[1] + sg.k0 * s.sk[2];
  const T* vb = v + b * s.sv[0] + hk * s.sv[1] + sg.k0 * s.sv[2];
  stage(sQ, D, qb, s.sq[2], r0, kRows, sg.nq, D);

  float m[kRows / kWarps], l[kRows / kWarps], acc[kRows / kWarps][DC];
#pragma unroll
  for (int rr = 0; rr < kRows / kWarps; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int t = 0; t < DC; ++t) acc[rr][t] = 0.f;
  }
  const int64_t r_last = min(r0 + kRows, sg.nq) - 1;
  const int64_t klo = mask.lo(r0) / kKeys * kKeys, khi = mask.hi(r_last);
  for (int64_t j0 = klo; j0 < khi; j0 += kKeys) {
    __syncthreads();
    stage(sK, ldk, kb, s.sk[2], j0, kKeys, sg.nk, D);
    stage(sV, D, vb, s.sv[2], j0, kKeys, sg.nk, D);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRows / kWarps; ++rr) {
      const int r = warp * (kRows / kWarps) + rr;
      const int64_t i = r0 + r, j = j0 + lane;
      float sc = 0.f;
      for (int d = 0; d < D; ++d) sc += sQ[r * D + d] * sK[lane * ldk + d];
      sc = mask.visible(i, j) ? sc * c : -INFINITY;
      float mx = sc;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[rr], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float p = exp2f(sc - m_use);
      const float alpha = exp2f(m[rr] - m_use);
      l[rr] = l[rr] * alpha + warp_sum(p);
      m[rr] = m_new;
#pragma unroll
      for (int t = 0; t < DC; ++t) acc[rr][t] *= alpha;
      for (int jj = 0; jj < kKeys; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
        for (int t = 0; t < DC; ++t) {
          const int d = lane + 32 * t;
          if (d < D) acc[rr][t] += pj * sV[jj * D + d];
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRows / kWarps; ++rr) {
    const int64_t i = r0 + warp * (kRows / kWarps) + rr;
    if (i >= sg.nq) continue;
    const bool empty = l[rr] == 0.f;
    const float inv = empty ? 0.f : 1.f / l[rr];
    T* o = out + (bh * s.Nq + sg.q0 + i) * D;
#pragma unroll
    for (int t = 0; t < DC; ++t) {
      const int d = lane + 32 * t;
      if (d < D) o[d] = from_float<T>(acc[rr][t] * inv);
    }
    if (lane == 0) lse[bh * s.Nq + sg.q0 + i] = empty ? -INFINITY : (m[rr] + log2f(l[rr])) * kLn2;
  }
}

// ------------------------------------------------------------------ backward: dK, dV

template <typename T, int DC>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(AttnShape s,
                                                            const T* __restrict__ q, const T* __restrict__ k,
                                                            const T* __restrict__ v, const T* __restrict__ dout,
                                                            int64_t sdo0, int64_t sdo1, int64_t sdo2,
                                                            const float* __restrict__ lse2,
                                                            const float* __restrict__ delta, T* __restrict__ dk,
                                                            T* __restrict__ dv) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(s.D), ldq = D + 1;
  float* sK = smem;                 // kKeys x D
  float* sV = sK + kKeys * D;       // kKeys x D
  float* sQ = sV + kKeys * D;       // 32 x (D + 1)
  float* sO = sQ + 32 * ldq;        // 32 x (D + 1)  (dO)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bhk = blockIdx.y, b = bhk / s.Hkv, hk = bhk % s.Hkv, grp = s.Hq / s.Hkv;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kKeys;
  const SeqDev sg = seq_of(s);
  if (j0 >= sg.nk) return;
  const MaskDev mask = make_mask(s, sg.nq, sg.nk);
  const float c = s.scale * kLog2e;
  stage(sK, D, k + b * s.sk[0] + hk * s.sk[1] + sg.k0 * s.sk[2], s.sk[2], j0, kKeys, sg.nk, D);
  stage(sV, D, v + b * s.sv[0] + hk * s.sv[1] + sg.k0 * s.sv[2], s.sv[2], j0, kKeys, sg.nk, D);

  constexpr int KW = kKeys / kWarps;  // keys per warp
  float dK[KW][DC], dV[KW][DC];
#pragma unroll
  for (int kk = 0; kk < KW; ++kk)
#pragma unroll
    for (int t = 0; t < DC; ++t) dK[kk][t] = dV[kk][t] = 0.f;
  const int64_t qlo = mask.qlo(j0) / 32 * 32, qhi = mask.qhi(min(j0 + kKeys, sg.nk));
  for (int64_t h = hk * grp; h < (hk + 1) * grp; ++h) {
    const int64_t bh = b * s.Hq + h;
    const T* qb = q + b * s.sq[0] + h * s.sq[1] + sg.q0 * s.sq[2];
    const T* ob = dout + b * sdo0 + h * sdo1 + sg.q0 * sdo2;
    for (int64_t r0 = qlo; r0 < qhi; r0 += 32) {
      __syncthreads();
      stage(sQ, ldq, qb, s.sq[2], r0, 32, sg.nq, D);
      stage(sO, ldq, ob, sdo2, r0, 32, sg.nq, D);
      __syncthreads();
      const int64_t i = r0 + lane;  // lane = query row
      const float l2 = i < sg.nq ? lse2[bh * s.Nq + sg.q0 + i] : INFINITY;
      const float dl = i < sg.nq ? delta[bh * s.Nq + sg.q0 + i] : 0.f;
#pragma unroll
      for (int kk = 0; kk < KW; ++kk) {
        const int jl = warp * KW + kk;
        const int64_t j = j0 + jl;
        float sc = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
          sc += sQ[lane * ldq + d] * sK[jl * D + d];
          dp += sO[lane * ldq + d] * sV[jl * D + d];
        }
        const float p = mask.visible(i, j) ? exp2f(sc * c - l2) : 0.f;
        const float ds = p * (dp - dl);
        for (int ii = 0; ii < 32; ++ii) {
          const float pi = __shfl_sync(0xffffffffu, p, ii), dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
          for (int t = 0; t < DC; ++t) {
            const int d = lane + 32 * t;
            if (d < D) {
              dV[kk][t] += pi * sO[ii * ldq + d];
              dK[kk][t] += dsi * sQ[ii * ldq + d];
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < KW; ++kk) {
    const int64_t j = j0 + warp * KW + kk;
    if (j >= sg.nk) continue;
#pragma unroll
    for (int t = 0; t < DC; ++t) {
      const int d = lane + 32 * t;
      if (d < D) {
        dk[(bhk * s.Nk + sg.k0 + j) * D + d] = from_float<T>(dK[kk][t] * s.scale);
        dv[(bhk * s.Nk + sg.k0 + j) * D + d] = from_float<T>(dV[kk][t]);
      }
    }
  }
}

// ------------------------------------------------------------------ backward: dQ

template <typename T, int DC>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(AttnShape s, const T* __restrict__ q,
                                                          const T* __restrict__ k, const T* __restrict__ v,
                                                          const T* __restrict__ dout, int64_t sdo0, int64_t sdo1,
                                                          int64_t sdo2, const float* __restrict__ lse2,
                                                          const float* __restrict__ delta, T* __restrict__ dq) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(s.D), ldk = D + 1;
  float* sQ = smem;                 // kRows x D
  float* sO = sQ + kRows * D;       // kRows x D (dO)
  float* sK = sO + kRows * D;       // kKeys x (D + 1)
  float* sV = sK + kKeys * ldk;     // kKeys x (D + 1)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bh = blockIdx.y, b = bh / s.Hq, h = bh % s.Hq, hk = h / (s.Hq / s.Hkv);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const SeqDev sg = seq_of(s);
  if (r0 >= sg.nq) return;
  const MaskDev mask = make_mask(s, sg.nq, sg.nk);
  const float c = s.scale * kLog2e;
  stage(sQ, D, q + b * s.sq[0] + h * s.sq[1] + sg.q0 * s.sq[2], s.sq[2], r0, kRows, sg.nq, D);
  stage(sO, D, dout + b * sdo0 + h * sdo1 + sg.q0 * sdo2, sdo2, r0, kRows, sg.nq, D);
  const T* kb = k + b * s.sk[0] + hk * s.sk[1] + sg.k0 * s.sk[2];
  const T* vb = v + b * s.sv[0] + hk * s.sv[1] + sg.k0 * s.sv[2];

  constexpr int RW = kRows / kWarps;
  float acc[RW][DC], l2[RW], dl[RW];
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
    const int64_t i = r0 + warp * RW + rr;
    l2[rr] = i < sg.nq ? lse2[bh * s.Nq + sg.q0 + i] : INFINITY;
    dl[rr] = i < sg.nq ? delta[bh * s.Nq + sg.q0 + i] : 0.f;
#pragma unroll
    for (int t = 0; t < DC; ++t) acc[rr][t] = 0.f;
  }
  const int64_t r_last = min(r0 + kRows, sg.nq) - 1;
  const int64_t klo = mask.lo(r0) / kKeys * kKeys, khi = mask.hi(r_last);
  for (int64_t j0 = klo; j0 < khi; j0 += kKeys) {
    __syncthreads();
    stage(sK, ldk, kb, s.sk[2], j0, kKeys, sg.nk, D);
    stage(sV, ldk, vb, s.sv[2], j0, kKeys, sg.nk, D);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
      const int r = warp * RW + rr;
      const int64_t i = r0 + r, j = j0 + lane;
      float sc = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) {
        sc += sQ[r * D + d] * sK[lane * ldk + d];
        dp += sO[r * D + d] * sV[lane * ldk + d];
      }
      const float p = mask.visible(i, j) ? exp2f(sc * c - l2[rr]) : 0.f;
      const float ds = p * (dp - dl[rr]);
      for (int jj = 0; jj < kKeys; ++jj) {
        const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
        for (int t = 0; t < DC; ++t) {
          const int d = lane + 32 * t;
          if (d < D) acc[rr][t] += dsj * sK[jj * ldk + d];
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
    const int64_t i = r0 + warp * RW + rr;
    if (i >= sg.nq) continue;
#pragma unroll
    for (int t = 0; t < DC; ++t) {
      const int d = lane + 32 * t;
      if (d < D) dq[(bh * s.Nq + sg.q0 + i) * D + d] = from_float<T>(acc[rr][t] * s.scale);
    }
  }
}

// ------------------------------------------------------------------ launchers

template <typename Kernel>
cudaError_t prepare(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  return cudaSuccess;
}

template <typename T, int DC>
cudaError_t fwd_launch(const AttnShape& s, const void* q, const void* k, const void* v, void* out, float* lse,
                       cudaStream_t stream) {
  const int D = static_cast<int>(s.D);
  const size_t smem = sizeof(float) * (kRows * D + kKeys * (D + 1) + kKeys * D);
  auto kernel = fwd_kernel<T, DC>;
  cudaError_t err = prepare(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t nq = s.cu_q ? s.max_nq : s.Nq;
  const dim3 grid(static_cast<unsigned>((nq + kRows - 1) / kRows), static_cast<unsigned>(s.B * s.Hq),
                  static_cast<unsigned>(s.cu_q ? s.nseq : 1));
  kernel<<<grid, kThreads, smem, stream>>>(s, static_cast<const T*>(q), static_cast<const T*>(k),
                                           static_cast<const T*>(v), static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T, int DC>
cudaError_t bwd_launch(const AttnShape& s, const int64_t sdo[3], const void* q, const void* k, const void* v,
                       const void* dout, const float* lse2, const float* delta, void* dq, void* dk, void* dv,
                       cudaStream_t stream) {
  const int D = static_cast<int>(s.D);
  const size_t smem_kv = sizeof(float) * (2 * kKeys * D + 2 * 32 * (D + 1));
  auto kv_kernel = bwd_dkdv_kernel<T, DC>;
  cudaError_t err = prepare(kv_kernel, smem_kv);
  if (err != cudaSuccess) return err;
  const int64_t nq = s.cu_q ? s.max_nq : s.Nq, nk = s.cu_q ? s.max_nk : s.Nk;
  const unsigned nz = static_cast<unsigned>(s.cu_q ? s.nseq : 1);
  const dim3 grid_kv(static_cast<unsigned>((nk + kKeys - 1) / kKeys), static_cast<unsigned>(s.B * s.Hkv), nz);
  kv_kernel<<<grid_kv, kThreads, smem_kv, stream>>>(
      s, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<const T*>(dout), sdo[0], sdo[1], sdo[2], lse2, delta, static_cast<T*>(dk), static_cast<T*>(dv));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem_q = sizeof(float) * (2 * kRows * D + 2 * kKeys * (D + 1));
  auto q_kernel = bwd_dq_kernel<T, DC>;
  err = prepare(q_kernel, smem_q);
  if (err != cudaSuccess) return err;
  const dim3 grid_q(static_cast<unsigned>((nq + kRows - 1) / kRows), static_cast<unsigned>(s.B * s.Hq), nz);
  q_kernel<<<grid_q, kThreads, smem_q, stream>>>(s, static_cast<const T*>(q), static_cast<const T*>(k),
                                                 static_cast<const T*>(v), static_cast<const T*>(dout), sdo[0],
                                                 sdo[1], sdo[2], lse2, delta, static_cast<T*>(dq));
  return cudaGetLastError();
}

template <typename T, typename F>
cudaError_t by_head_dim(int64_t D, F&& f) {
  // Per-lane column registers for D <= 64, <= 128, <= 256 (three instantiations keep nvcc time reasonable).
  switch ((D + 63) / 64) {
    case 1: return f(std::integral_constant<int, 2>{});
    case 2: return f(std::integral_constant<int, 4>{});
    case 3:
    case 4: return f(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t fwd_typed(const AttnShape& s, const void* q, const void* k, const void* v, void* out, float* lse,
                      cudaStream_t stream) {
  return by_head_dim<T>(s.D, [&](auto dc) { return fwd_launch<T, decltype(dc)::value>(s, q, k, v, out, lse, stream); });
}

template <typename T>
cudaError_t bwd_typed(const AttnShape& s, const int64_t sdo[3], const void* q, const void* k, const void* v,
                      const void* dout, const float* lse2, const float* delta, void* dq, void* dk, void* dv,
                      cudaStream_t stream) {
  return by_head_dim<T>(s.D, [&](auto dc) {
    return bwd_launch<T, decltype(dc)::value>(s, sdo, q, k, v, dout, lse2, delta, dq, dk, dv, stream);
  });
}

}  // namespace

cudaError_t flash_attention_fwd(DType dtype, const AttnShape& s, const void* q, const void* k, const void* v,
                                void* out, float* lse, cudaStream_t stream) {
  if (s.B * s.Hq * s.Nq == 0 || (s.cu_q && (s.nseq == 0 || s.max_nq == 0))) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return fwd_typed<float>(s, q, k, v, out, lse, stream);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(s, q, k, v, out, lse, stream);
    case DType::kFloat16: return fwd_typed<__half>(s, q, k, v, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t flash_attention_bwd(DType dtype, const AttnShape& s, const int64_t sdo[3], const void* q, const void* k,
                                const void* v, const void* dout, const float* lse2, const float* delta, void* dq,
                                void* dk, void* dv, cudaStream_t stream) {
  if (s.B * s.Hq * s.Nq == 0 || s.Nk == 0 || (s.cu_q && (s.nseq == 0 || s.max_nq == 0 || s.max_nk == 0)))
    return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return bwd_typed<float>(s, sdo, q, k, v, dout, lse2, delta, dq, dk, dv, stream);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(s, sdo, q, k, v, dout, lse2, delta, dq, dk, dv, stream);
    case DType::kFloat16: return bwd_typed<__half>(s, sdo, q, k, v, dout, lse2, delta, dq, dk, dv, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fmk::cuda
