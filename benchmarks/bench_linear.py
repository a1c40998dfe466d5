"""fmkernels.linear vs torch.nn.functional.linear (MKL), fp32, forward + backward (dX and dW), side by side.

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
