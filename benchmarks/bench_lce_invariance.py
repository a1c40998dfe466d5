"""Cost of making linear_cross_entropy batch-invariant by computing every chunk at a fixed row count (the only way
found: oneDNN's fp32 GEMM picks M-dependent blockings, so a row's logits and dx change with the batch size; padding
every chunk to `chunk` rows gives each row the same GEMM shape). Measures fwd+bwd at T tokens against T padded up
to a multiple of the chunk (padded rows ignored), interleaved, median of N.

  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_lce_invariance.py
"""
import statistics
import time

import torch

import fmkernels as fk
from fmkernels.ops.cross_entropy import default_chunk_size


def step(x, w, t):
    x.grad = w.grad = None
    fk.linear_cross_entropy(x, w, t).backward()


def main(H=384, V=8192, Ts=(1, 100, 1000, 2048, 3000), reps=7):
    torch.manual_seed(0)
    w = torch.randn(V, H, requires_grad=True)
    print(f"H {H} V {V} fp32, threads {torch.get_num_threads()}; median of {reps} interleaved fwd+bwd")
    for T in Ts:
        chunk = default_chunk_size(max(T, 256), V)
        Tp = -(-T // chunk) * chunk
        x = torch.randn(T, H, requires_grad=True)
        t = torch.randint(0, V, (T,))
        xp = torch.cat([x.detach(), torch.zeros(Tp - T, H)]).requires_grad_()
        tp = torch.cat([t, torch.full((Tp - T,), -100)])
        a, b = [], []
        for _ in range(reps):
            t0 = time.perf_counter(); step(x, w, t); a.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); step(xp, w, tp); b.append(time.perf_counter() - t0)
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"T {T:5d} (padded to {Tp:5d}, chunk {chunk}): {ma * 1e3:8.2f} ms vs {mb * 1e3:8.2f} ms  cost {mb / ma - 1:+.1%}")


if __name__ == "__main__":
    main()
