"""Linear + cross-entropy (fmkernels.linear_cross_entropy), forward+backward, fp32 and bf16, vs its plain-PyTorch peer,
at the anchor training run's shapes (batch 8 x seq 256 = 2048 tokens, dim 384, 6 heads x 64, FFN 1024, vocab 8192).
x (2048, 384) @ W (8192, 384)^T then F.cross_entropy, vs fmkernels' chunked op; quoted in FLOPs."""
import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from benchmarks.harness import measure
from fmkernels.testing import available_backends

B, N, V, DIM = 8, 256, 8192, 384
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _backends(op):
    return [b for b in available_backends(op, "cpu") if b != "triton"]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", _backends("linear_cross_entropy") + ["torch"])
def test_linear_cross_entropy_fwd_bwd(benchmark, impl, dtype_name):
    dtype = DTYPES[dtype_name]
    x = torch.randn(B * N, DIM, requires_grad=True)
    w = (torch.randn(V, DIM) * 0.05).requires_grad_(True)
    t = torch.randint(0, V, (B * N,))

    def fn():
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if impl == "torch":
                loss = F.cross_entropy(F.linear(x, w).float(), t)
            else:
                loss = fk.linear_cross_entropy(x, w, t, backend=impl)
        loss.backward()

    measure(benchmark, fn, group=f"linear+CE fwd+bwd {dtype_name} T{B * N} H{DIM} V{V}",
            label="torch linear + F.cross_entropy" if impl == "torch" else f"fmk-{impl}", peer=impl == "torch",
            flops=3 * 2 * B * N * DIM * V, peak="bf16_gflops" if dtype == torch.bfloat16 else "fp32_gflops")
