"""RoPE (fmkernels.rope), forward+backward, fp32 and bf16, vs its plain-PyTorch peer,
at the anchor training run's shapes (batch 8 x seq 256 = 2048 tokens, dim 384, 6 heads x 64, FFN 1024, vocab 8192).
q (2048 tokens, 6 heads, 64) and k vs rotate-half via torch.cat (what plain Llama code does); the
traffic model counts each tensor read/written once per pass."""
import pytest
import torch

import fmkernels as fk
from benchmarks.harness import measure
from fmkernels.models.plain import _apply_rope
from fmkernels.ops.rope import rope_cos_sin
from fmkernels.testing import available_backends

B, N, H, D = 8, 256, 6, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _backends(op):
    return [b for b in available_backends(op, "cpu") if b != "triton"]


def _rope_case(dtype):
    qkv = torch.randn(B, N, 3 * H, D, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(N, D)
    g = torch.randn(B, N, H, D, dtype=dtype)
    return qkv, cos, sin, g


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", _backends("rope") + ["torch"])
def test_rope_fwd_bwd(benchmark, impl, dtype_name):
    qkv, cos, sin, g = _rope_case(DTYPES[dtype_name])

    def fn():
        qkv.grad = None
        q, k = qkv[:, :, :H], qkv[:, :, H : 2 * H]
        if impl == "torch":
            oq = _apply_rope(q.transpose(1, 2), cos, sin)
            ok = _apply_rope(k.transpose(1, 2), cos, sin)
            torch.autograd.backward((oq, ok), (g.transpose(1, 2), g.transpose(1, 2)))
        else:
            oq, ok = fk.rope(q, k, cos, sin, backend=impl)
            torch.autograd.backward((oq, ok), (g, g))

    measure(benchmark, fn, group=f"rope fwd+bwd {dtype_name} B{B} N{N} H{H} D{D}",
            label="torch rotate-half" if impl == "torch" else f"fmk-{impl}", peer=impl == "torch",
            nbytes=8 * B * N * H * D * qkv.element_size(), peak="mem_gbs")
