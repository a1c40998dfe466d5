"""Fused training ops vs their plain-PyTorch peers, forward+backward, fp32 and bf16, at the shapes of the
anchor training run (batch 8 x seq 256 = 2048 tokens, dim 384, 6 heads x 64, FFN 1024, vocab 8192):
- rope: q (2048 tokens, 6 heads, 64) and k, rotate-half via torch.cat (what plain Llama code does);
- swiglu: packed (2048, 2 x 1024) -> silu(a) * b;
- linear + cross-entropy: x (2048, 384) @ W (8192, 384)^T then F.cross_entropy, vs fmkernels' chunked op.
Traffic models count each tensor read/written once per pass (elementwise ops); CE is quoted in FLOPs."""
import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from benchmarks.harness import measure
from fmkernels.models.plain import _apply_rope
from fmkernels.ops.rope import rope_cos_sin
from fmkernels.testing import available_backends

B, N, H, D, FF, V, DIM = 8, 256, 6, 64, 1024, 8192, 384
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
