"""SwiGLU (fmkernels.swiglu), forward+backward, fp32 and bf16, vs its plain-PyTorch peer,
at the anchor training run's shapes (batch 8 x seq 256 = 2048 tokens, dim 384, 6 heads x 64, FFN 1024, vocab 8192).
packed (2048, 2 x 1024) -> silu(a) * b; the traffic model counts each tensor read/written once per pass."""
import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from benchmarks.harness import measure
from fmkernels.testing import available_backends

B, N, FF = 8, 256, 1024
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _backends(op):
    return [b for b in available_backends(op, "cpu") if b != "triton"]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", _backends("swiglu") + ["torch"])
def test_swiglu_fwd_bwd(benchmark, impl, dtype_name):
    ab = torch.randn(B * N, 2 * FF, dtype=DTYPES[dtype_name], requires_grad=True)
    g = torch.randn(B * N, FF, dtype=ab.dtype)

    def fn():
        ab.grad = None
        y = F.silu(ab[:, :FF]) * ab[:, FF:] if impl == "torch" else fk.swiglu(ab, backend=impl)
        y.backward(g)

    measure(benchmark, fn, group=f"swiglu fwd+bwd {dtype_name} {B * N}x{FF}",
            label="torch silu*mul" if impl == "torch" else f"fmk-{impl}", peer=impl == "torch",
            nbytes=7 * B * N * FF * ab.element_size(), peak="mem_gbs")
