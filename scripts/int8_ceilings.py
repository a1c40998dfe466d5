"""Hardware ceilings for the int8 targets of issue #4, measured side by side with the kernels they bound.

1. GEMV (int8_mm at M=1, N=K=4096; Int8Linear batch 1): every one of the 16 MiB of int8 weight must be read once,
   so no kernel can beat a bare read of those bytes. The script times a read-only AVX-512 pass over the same
   buffer (compiled here with load_inline, same thread pool), torch._int_mm, fbgemm's dynamic Linear and ours,
   interleaved, and prints the largest speedup any kernel could have over torch: t_torch / t_read.
2. Compute-bound shapes (Int8Linear batch 64, int8_mm 2048^3): a register-only vpdpbusd loop gives the int8 peak
   of a core; the largest speedup over a peer is peak / peer's GOPS. CPU time (time.process_time) is reported next to
   wall time because on a shared machine wall time counts the time other tenants hold the cores.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/int8_ceilings.py [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.cpp_extension import load_inline  # noqa: E402

import fmkernels as fk  # noqa: E402
from fmkernels.ops import quant as Q  # noqa: E402

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

__attribute__((target("avx512f,avx512bw"))) static int64_t read_chunk(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
}

// read every byte of t once (64-byte vector loads), split over the intra-op pool like the kernels
int64_t read_bytes(const at::Tensor& t) {
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t n = t.numel() * t.element_size();
  const int64_t chunk = 256 * 1024;
  std::vector<int64_t> part((n + chunk - 1) / chunk);
  at::parallel_for(0, (int64_t)part.size(), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = read_chunk(p + c * chunk, std::min(chunk, n - c * chunk));
  });
  int64_t s = 0;
  for (int64_t v : part) s ^= v;
  return s;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static int64_t dp_loop(int64_t n) {
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  __m512i c0 = a, c1 = a, c2 = a, c3 = a, c4 = a, c5 = a, c6 = a, c7 = a, c8 = a, c9 = a, c10 = a, c11 = a;
  for (int64_t i = 0; i < n; ++i) {
#define D(c) c = _mm512_dpbusd_epi32(c, a, b); __asm__("" : "+v"(c));
    D(c0) D(c1) D(c2) D(c3) D(c4) D(c5) D(c6) D(c7) D(c8) D(c9) D(c10) D(c11)
#undef D
  }
  __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                               _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
  s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)));
  return _mm512_reduce_add_epi32(s);
}

// n iterations of 12 independent zmm vpdpbusd (register operands) on each pool thread: 12 * 64 * 2 * n ops each
int64_t dpbusd_peak(int64_t n) {
  const int64_t nt = at::get_num_threads();
  std::vector<int64_t> r(nt);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) { for (int64_t t = t0; t < t1; ++t) r[t] = dp_loop(n); });
  int64_t s = 0;
  for (int64_t v : r) s += v;
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_bytes", &read_bytes);
  m.def("dpbusd_peak", &dpbusd_peak);
}
"""


def _probe():
    return load_inline("fmk_int8_ceilings", cpp_sources=[_SRC], extra_cflags=["-O2", "-fopenmp"],
                       extra_ldflags=["-fopenmp"])


def _time(fn, n):
    """(best wall seconds, best CPU seconds) per call over 3 batches of n calls."""
    fn()
    bw = bc = float("inf")
    for _ in range(3):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        bw = min(bw, (time.perf_counter() - w0) / n)
        bc = min(bc, (time.process_time() - c0) / n)
    return bw, bc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probe = _probe()
    N = K = 4096
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    a1 = torch.randint(-127, 128, (1, K), dtype=torch.int8, generator=g)
    p, c = Q.int8_pack_weight(w8)
    ones1, onesn, wt = torch.ones(1), torch.ones(N), w8.t()
    torch.manual_seed(0)
    lin = nn.Linear(N, K)
    ours_lin = fk.nn.Int8Linear.from_float(lin)
    qd = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    x1, x64 = torch.randn(1, K), torch.randn(64, K)
    nbytes = N * K

    gemv = {
        "read 16 MiB (ceiling)": lambda: probe.read_bytes(p),
        "fmk int8_mm M=1": lambda: Q.int8_mm(a1, ones1, p, c, onesn, out_dtype=torch.int32, backend="cpu"),
        "torch._int_mm M=1": lambda: torch._int_mm(a1, wt),
        "fmk Int8Linear b1": lambda: ours_lin(x1),
        "quantize_dynamic b1": lambda: qd(x1),
    }
    print(f"threads={args.threads}  (GEMV: weight bytes / time; best of {args.rounds} interleaved rounds)")
    best = {k: [float("inf"), float("inf")] for k in gemv}
    with torch.no_grad():
        for _ in range(args.rounds):
            for k, fn in gemv.items():
                w, cpu = _time(fn, 20)
                best[k] = [min(best[k][0], w), min(best[k][1], cpu)]
    for k, (w, cpu) in best.items():
        print(f"  {k:24s} wall {w * 1e6:8.1f} us  {nbytes / w / 1e9:6.1f} GB/s   cpu {cpu * 1e6:8.1f} us")
    rd = best["read 16 MiB (ceiling)"][0]
    print(f"  largest possible speedup over torch._int_mm at M=1 (t_torch / t_read): "
          f"{best['torch._int_mm M=1'][0] / rd:.2f}x   fmk achieved {best['torch._int_mm M=1'][0] / best['fmk int8_mm M=1'][0]:.2f}x")
    print(f"  largest possible speedup over quantize_dynamic at batch 1: {best['quantize_dynamic b1'][0] / rd:.2f}x   "
          f"fmk achieved {best['quantize_dynamic b1'][0] / best['fmk Int8Linear b1'][0]:.2f}x")

    iters = 2_000_000
    ops_peak = 12 * 64 * 2 * iters * args.threads
    comp = {
        "vpdpbusd peak loop": (lambda: probe.dpbusd_peak(iters), ops_peak),
        "fmk Int8Linear b64": (lambda: ours_lin(x64), 2.0 * 64 * N * K),
        "quantize_dynamic b64": (lambda: qd(x64), 2.0 * 64 * N * K),
    }
    print(f"compute-bound (int8 GOPS per wall second / per CPU second; best of {args.rounds} rounds)")
    bestc = {k: [float("inf"), float("inf")] for k in comp}
    with torch.no_grad():
        for _ in range(args.rounds):
            for k, (fn, _ops) in comp.items():
                w, cpu = _time(fn, 3)
                bestc[k] = [min(bestc[k][0], w), min(bestc[k][1], cpu)]
    for k, (w, cpu) in bestc.items():
        ops = comp[k][1]
        print(f"  {k:24s} wall {w * 1e3:8.2f} ms  {ops / w / 1e9:7.0f} GOPS   cpu-time {ops / cpu / 1e9:7.0f} GOPS/cpu-s")
    pk = ops_peak / bestc["vpdpbusd peak loop"][1]
    qd_rate = comp["quantize_dynamic b64"][1] / bestc["quantize_dynamic b64"][1]
    print(f"  largest possible speedup over quantize_dynamic at batch 64 (peak / its GOPS, per CPU second): "
          f"{pk / qd_rate:.2f}x   fmk achieved {bestc['quantize_dynamic b64'][1] / bestc['fmk Int8Linear b64'][1]:.2f}x")


if __name__ == "__main__":
    main()
