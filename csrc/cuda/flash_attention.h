// Flash attention CUDA launchers (raw pointers + stream; no ATen). Layout (B, H, N, D) with unit stride along D
// and arbitrary element strides for B, H, N; outputs contiguous. Masks bottom-right aligned (FlashAttention-2):
// query i sees key j when i + Nk - Nq - left <= j <= i + Nk - Nq + right; a negative bound is unbounded.
#pragma once
#include "cuda/launch.h"

namespace fmk::cuda {

struct AttnShape {
  int64_t B, Hq, Hkv, Nq, Nk, D;
  int64_t window_left, window_right;
  float scale;  // softmax scale (natural units)
  int64_t sq[3], sk[3], sv[3];  // element strides of q, k, v along B, H, N
  // Packed sequences (varlen): when cu_q / cu_k (device int32 (nseq + 1,)) are set, B == 1, Nq / Nk are the
  // total rows, sequence z = blockIdx.z has query rows [cu_q[z], cu_q[z+1]) and key rows [cu_k[z], cu_k[z+1])
  // (masks bottom-right aligned per sequence), and max_nq / max_nk (>= every sequence) size the grid. Outputs keep
  // their layout with N = the total rows: out / dq (1, Hq, Nq, D), lse (1, Hq, Nq), dk / dv (1, Hkv, Nk, D).
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t nseq = 1, max_nq = 0, max_nk = 0;
};

// out (B, Hq, Nq, D) contiguous in q's dtype; lse (B, Hq, Nq) fp32 (natural log; -inf on rows that see no key).
cudaError_t flash_attention_fwd(DType dtype, const AttnShape& s, const void* q, const void* k, const void* v,
                                void* out, float* lse, cudaStream_t stream);

// dO with strides sdo (B, H, N); lse2 = lse * log2(e) with +inf on rows that see no key; delta = rowsum(dO * O)
// (both (B, Hq, Nq) fp32 contiguous). dq (B, Hq, Nq, D), dk/dv (B, Hkv, Nk, D) contiguous. Deterministic:
// dK/dV per key block, dQ per query block (no atomics).
cudaError_t flash_attention_bwd(DType dtype, const AttnShape& s, const int64_t sdo[3], const void* q, const void* k,
                                const void* v, const void* dout, const float* lse2, const float* delta, void* dq,
                                void* dk, void* dv, cudaStream_t stream);

}  // namespace fmk::cuda
