"""fmkernels.linear vs torch.nn.functional.linear (MKL), fp32, forward + backward (dX and dW), side by side;
and the weight-gradient product alone: fmkernels.ops.linear.matmul_tn (fmkernels::mm_tn_) vs torch.mm (MKL).

T = 2048 tokens (the trainer's batch 8 x seq 256) and the transformer's projections at d384 (qkv, o, gate/up,
down). Report ms; GFLOP/s = 6 * T * K * N / time (forward 2TKN + dX 2TKN + dW 2TKN).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/bench_linear.py -o python_files='bench_*.py' -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk

SHAPES = [(384, 1152), (384, 384), (384, 2048), (1024, 384)]  # (K, N)
T = 2048


@pytest.mark.parametrize("K,N", SHAPES, ids=[f"K{k}_N{n}" for k, n in SHAPES])
@pytest.mark.parametrize("impl", ["fmkernels", "torch F.linear"])
def test_linear_fwd_bwd(benchmark, impl, K, N):
    torch.manual_seed(0)
    x = torch.randn(T, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    g = torch.randn(T, N)
    fn = fk.linear if impl == "fmkernels" else F.linear

    def step():
        y = fn(x, w)
        y.backward(g)
        x.grad = w.grad = None

    benchmark.group = f"linear fp32 fwd+bwd T{T} K{K} N{N}"
    benchmark.extra_info["gflops"] = 6 * T * K * N / 1e9
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)


DW_SHAPES = [(2048, 1152, 384), (2048, 384, 384), (2048, 2048, 384), (2048, 384, 1024), (512, 8192, 384),
             (2048, 2048, 2048)]  # (T, N, K): the d384 layers' dW, the fused loss's vocab-8192 chunk, a square one


@pytest.mark.parametrize("Tn,N,K", DW_SHAPES, ids=[f"T{t}_N{n}_K{k}" for t, n, k in DW_SHAPES])
@pytest.mark.parametrize("impl", ["fmkernels mm_tn", "torch.mm"])
def test_weight_grad(benchmark, impl, Tn, N, K):
    from fmkernels.ops.linear import matmul_tn

    torch.manual_seed(0)
    g, x = torch.randn(Tn, N), torch.randn(Tn, K)  # dY, X
    out = torch.empty(N, K)
    if impl == "torch.mm":
        def step():
            torch.mm(g.t(), x, out=out)
    else:
        def step():
            matmul_tn(g, x, out=out)

    benchmark.group = f"weight grad dY^T X fp32 T{Tn} N{N} K{K}"
    benchmark.extra_info["gflops"] = 2 * Tn * N * K / 1e9
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
