"""GPU benchmarks side by side with the PyTorch peers, one JSON (make gpu-check runs it; needs a CUDA device).

  attention bf16 fwd+bwd      fmkernels triton / cuda     vs  torch SDPA (FlashAttention backend)
  int8 W8A8 GEMM              fmkernels triton / cuda     vs  torch._int_mm, cuBLAS bf16
  int4 weight-only, M 1-16    fmkernels triton / cuda     vs  cuBLAS bf16
  fp8 e4m3 GEMM (sm_89+)      fmkernels triton / cuda     vs  torch._scaled_mm, cuBLAS bf16
  2:4 sparse GEMM             fmkernels triton / cuda     vs  to_sparse_semi_structured (cuSPARSELt/CUTLASS), bf16
  BSR 50% blocks              fmkernels triton / cuda     vs  dense bf16
  RMSNorm / SwiGLU fwd        fmkernels triton / cuda     vs  torch eager (GB/s)
  fused linear+CE fwd+bwd     fmkernels triton / cuda     vs  torch logits + F.cross_entropy (time, peak memory)

Each case runs under its own try/except (a failing backend is recorded, not fatal); times are the median of
CUDA-event-timed calls after warm-up. Usage: python scripts/gpu_bench.py --out report_dir [--quick] [--budget S]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, warmup=3, reps=10) -> float:
    """Median milliseconds of fn() over reps CUDA-event-timed calls (wall clock on CPU: --smoke-cpu)."""
    import torch

    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def cases(quick: bool, dev: str = "cuda", d: int = 1):
    """(group, {name: fn or 'why unavailable'}, meta) per case; dev="cpu" with shapes divided by d is the
    harness's own smoke test (--smoke-cpu: every line runs, fmkernels' CPU backends stand in for the GPU ones)."""
    import torch
    import torch.nn.functional as F

    import fmkernels as fk
    from fmkernels import ops
    from fmkernels.testing import available_backends

    bf = torch.bfloat16
    cap = torch.cuda.get_device_capability() if dev == "cuda" else (9, 0)
    mine = ("triton", "cuda") if dev == "cuda" else ("cpu",)

    def fmk(op, dtype, key=()):
        return [b for b in mine if b in available_backends(op, dev, dtype, *((key,) if key else ()))]

    # ---- attention
    for (B, H, N, D) in ([(4, 16, 2048 // d, 128)] if quick else [(4, 16, 2048 // d, 128), (8, 16, 1024 // d, 64)]):
        for causal in (False, True):
            q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            flops = 4 * B * H * N * N * D * 2.5 * (0.5 if causal else 1.0)  # fwd + bwd (2.5x fwd)
            group = f"attention bf16 fwd+bwd B{B} H{H} N{N} D{D}{' causal' if causal else ''}"
            impls = {f"fmk-{b}": (lambda b=b: ops.flash_attention(q, k, v, causal=causal, backend=b).backward(do))
                     for b in fmk("flash_attention", bf)}
            impls["torch SDPA"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)
            yield group, impls, {"flops": flops}
    # ---- int8 W8A8
    M = N = K = 4096 // d
    a8 = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8)
    b8 = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8)
    packed, comp = ops.int8_pack_weight(b8)
    sa, sb = torch.rand(M, device=dev), torch.rand(N, device=dev)
    xb, wb = torch.randn(M, K, device=dev, dtype=bf), torch.randn(N, K, device=dev, dtype=bf)
    impls = {f"fmk-{b}": (lambda b=b: ops.int8_mm(a8, sa, packed, comp, sb, None, out_dtype=bf, backend=b))
             for b in fmk("int8_mm", bf)}
    if hasattr(torch, "_int_mm"):
        impls["torch._int_mm"] = lambda: torch._int_mm(a8, b8.t())
    impls["cuBLAS bf16"] = lambda: xb @ wb.t()
    yield f"int8 GEMM {M}x{N}x{K}", impls, {"flops": 2 * M * N * K}
    # ---- int4 weight-only, small batch
    w = torch.randn(N, K, device=dev)
    p4, s4, z4 = ops.int4_quantize_weight(w, 128)  # K >= 128 at every scale
    for m in (1, 16):
        x = torch.randn(m, K, device=dev, dtype=bf)
        impls = {f"fmk-{b}": (lambda b=b, x=x: ops.int4_mm(x, p4, s4, z4, 128, N, None, backend=b))
                 for b in fmk("int4_mm", bf)}
        impls["cuBLAS bf16"] = lambda x=x: x @ wb.t()
        yield f"int4 weight-only g128 M={m} {N}x{K}", impls, {"flops": 2 * m * N * K}
    # ---- fp8
    if cap >= (8, 9) and dev == "cuda":
        af, saf = ops.fp8_quantize(torch.randn(M, K, device=dev))
        bf8, sbf = ops.fp8_quantize(torch.randn(N, K, device=dev))
        impls = {f"fmk-{b}": (lambda b=b: ops.fp8_mm(af, saf, bf8, sbf, None, out_dtype=bf, backend=b))
                 for b in fmk("fp8_mm", bf)}
        if hasattr(torch, "_scaled_mm"):
            impls["torch._scaled_mm"] = lambda: torch._scaled_mm(af, bf8.t(), scale_a=saf.reshape(-1, 1).float(),
                                                                  scale_b=sbf.reshape(1, -1).float(), out_dtype=bf)
        impls["cuBLAS bf16"] = lambda: xb @ wb.t()
        yield f"fp8 e4m3 GEMM {M}x{N}x{K}", impls, {"flops": 2 * M * N * K}
    # ---- 2:4 on an MLP shape
    Ms, Ns, Ks = 2048 // d, 11008 // d // 32 * 32, 4096 // d
    w24 = torch.randn(Ns, Ks, device=dev, dtype=bf)
    values, meta = ops.compress_24(w24, prune=True)
    dense = ops.decompress_24(values, meta)
    xs = torch.randn(Ms, Ks, device=dev, dtype=bf)
    impls = {f"fmk-{b}": (lambda b=b: ops.sparse24_mm(xs, values, meta, backend=b))
             for b in fmk("sparse24_mm", bf, (Ms, Ns, Ks))}
    try:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(dense)
        impls["to_sparse_semi_structured"] = lambda: F.linear(xs, ws)
    except Exception as e:  # not built with cuSPARSELt/CUTLASS sparse kernels
        impls["to_sparse_semi_structured"] = f"unavailable: {type(e).__name__}: {e}"
    impls["cuBLAS bf16 dense"] = lambda: F.linear(xs, dense)
    yield f"2:4 sparse GEMM {Ms}x{Ns}x{Ks}", impls, {"flops": 2 * Ms * Ns * Ks}
    # ---- BSR, half of the 64x64 blocks kept
    nb = 4096 // d
    wbsr = torch.randn(nb, nb, device=dev, dtype=bf)
    mask = torch.rand(nb // 64, nb // 64, device=dev) < 0.5
    blocks, row_ptr, col_idx = ops.compress_bsr(wbsr, 64, block_mask=mask)
    dense_b = ops.decompress_bsr(blocks, row_ptr, col_idx, nb)
    xbs = torch.randn(2048 // d, nb, device=dev, dtype=bf)
    impls = {f"fmk-{b}": (lambda b=b: ops.bsr_mm(xbs, blocks, row_ptr, col_idx, backend=b)) for b in fmk("bsr_mm", bf)}
    impls["cuBLAS bf16 dense"] = lambda: F.linear(xbs, dense_b)
    yield f"BSR 64x64 blocks 50% {2048 // d}x{nb}x{nb}", impls, {"flops": 2 * (2048 // d) * nb * nb * 0.5}
    # ---- memory-bound ops
    xr = torch.randn(16384 // d, 4096, device=dev, dtype=bf)
    wr = torch.randn(4096, device=dev, dtype=bf)
    impls = {f"fmk-{b}": (lambda b=b: fk.rms_norm(xr, wr, backend=b)) for b in fmk("rms_norm", bf)}
    impls["torch eager"] = lambda: (xr.float() * torch.rsqrt(xr.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(bf) * wr
    yield f"RMSNorm fwd bf16 {16384 // d}x4096", impls, {"bytes": 2 * xr.numel() * 2}
    ga, gb = (torch.randn(16384 // d, 5504, device=dev, dtype=bf) for _ in range(2))
    impls = {f"fmk-{b}": (lambda b=b: ops.swiglu(ga, gb, backend=b)) for b in fmk("swiglu", bf)}
    impls["torch eager"] = lambda: F.silu(ga) * gb
    yield f"SwiGLU fwd bf16 {16384 // d}x5504", impls, {"bytes": 3 * ga.numel() * 2}
    # ---- fused linear + cross-entropy
    T, Hd, V = 8192 // d, 2048 // d, 32000 // d
    xc = torch.randn(T, Hd, device=dev, dtype=bf, requires_grad=True)
    wc = torch.randn(V, Hd, device=dev, dtype=bf, requires_grad=True)
    tc = torch.randint(0, V, (T,), device=dev)
    impls = {f"fmk-{b}": (lambda b=b: ops.linear_cross_entropy(xc, wc, tc, backend=b).backward())
             for b in fmk("linear_cross_entropy", bf)}
    impls["torch logits + F.cross_entropy"] = lambda: F.cross_entropy((xc @ wc.t()).float(), tc).backward()
    yield f"fused linear+CE fwd+bwd T{T} H{Hd} V{V}", impls, {"flops": 6 * T * Hd * V, "peak_memory": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu-report"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; cases past it are skipped")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="no GPU: run every case once on CPU at 1/16 of the shapes (checks this script, measures nothing)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("gpu_bench: no CUDA device; nothing measured")
        return 0
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke_cpu else "cpu"
    out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (smoke run)", "torch": torch.__version__,
           "groups": []}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    gen = cases(args.quick, dev, 16 if dev == "cpu" else 1)
    while True:
        if time.time() - t0 > args.budget:
            out["groups"].append({"group": "(rest)", "skipped": f"budget of {args.budget} s spent"})
            break
        try:
            group, impls, meta = next(gen)
        except StopIteration:
            break
        except Exception as e:  # a case's setup failed: record it and stop (the generator is closed)
            out["groups"].append({"group": "(setup)", "error": f"{type(e).__name__}: {e}",
                                  "trace": traceback.format_exc()[-1500:]})
            break
        rows = {}
        for name, fn in impls.items():
            if isinstance(fn, str):
                rows[name] = {"skipped": fn}
                continue
            try:
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if dev == "cuda" else 0
                ms = timed(fn)
                r = {"ms": round(ms, 4)}
                if "flops" in meta:
                    r["tflops"] = round(meta["flops"] / ms / 1e9, 2)
                if "bytes" in meta:
                    r["gbs"] = round(meta["bytes"] / ms / 1e6, 1)
                if meta.get("peak_memory") and dev == "cuda":
                    r["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                rows[name] = r
            except Exception as e:
                rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out["groups"].append({"group": group, "results": rows})
        out["seconds"] = round(time.time() - t0, 1)
        (args.out / "gpu_bench.json").write_text(json.dumps(out, indent=1))  # kept if a later case hangs
        line = "  ".join(f"{n}: {r.get('ms', r.get('error', r.get('skipped')))}" for n, r in rows.items())
        print(f"{group}: {line}", flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(out, indent=1))
    print(f"gpu_bench: {len(out['groups'])} groups in {out['seconds']} s -> {args.out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
