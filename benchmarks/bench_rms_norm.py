"""RMSNorm forward and forward+backward, rows 4096 x hidden 4096, fp32 and bf16: every fmkernels backend
present vs torch.nn.functional.rms_norm (with autograd). Traffic model: fwd reads x, writes y (2 passes);
fwd+bwd adds reading dy and x and writing dx (5 passes)."""
import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from benchmarks.harness import measure
from fmkernels.testing import available_backends

ROWS, HIDDEN = 4096, 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = [b for b in available_backends("rms_norm", "cpu") if b != "triton"]  # interpreter: not a benchmark


def _inputs(dtype):
    x = torch.randn(ROWS, HIDDEN, dtype=dtype, requires_grad=True)
    w = torch.randn(HIDDEN, dtype=dtype, requires_grad=True)
    g = torch.randn(ROWS, HIDDEN, dtype=dtype)
    return x, w, g


def _run(benchmark, dtype_name, impl, label, peer, backward):
    dtype = DTYPES[dtype_name]
    x, w, g = _inputs(dtype)
    if backward:

        def fn():
            x.grad = w.grad = None
            impl(x, w).backward(g)

    else:
        xd, wd = x.detach(), w.detach()

        def fn():
            impl(xd, wd)

    passes = 5 if backward else 2
    mode = "fwd+bwd" if backward else "fwd"
    measure(
        benchmark, fn, group=f"rms_norm {mode} {dtype_name} {ROWS}x{HIDDEN}", label=label,
        nbytes=passes * ROWS * HIDDEN * x.element_size(), peak="mem_gbs", peer=peer,
    )


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_fmkernels(benchmark, backend, dtype_name, backward):
    _run(benchmark, dtype_name, lambda x, w: fk.rms_norm(x, w, backend=backend), f"fmk-{backend}", False, backward)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_rms_norm_torch(benchmark, dtype_name, backward):
    _run(benchmark, dtype_name, lambda x, w: F.rms_norm(x, (HIDDEN,), w, 1e-6), "torch F.rms_norm", True, backward)


GPU_BACKENDS = ("cuda", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl_name", [*GPU_BACKENDS, "torch"])
def test_rms_norm_gpu(benchmark, impl_name, dtype_name, backward):
    """Same shapes on a CUDA device; the Liger-class target is >= 85% of HBM bandwidth."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dtype = DTYPES[dtype_name]
    if impl_name != "torch" and impl_name not in available_backends("rms_norm", "cuda", dtype):
        pytest.skip(f"{impl_name} not available")
    x = torch.randn(ROWS * 4, HIDDEN, dtype=dtype, device="cuda", requires_grad=True)
    w = torch.randn(HIDDEN, dtype=dtype, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    if impl_name == "torch":
        impl = lambda a, b: F.rms_norm(a, (HIDDEN,), b, 1e-6)  # noqa: E731
    else:
        impl = lambda a, b: fk.rms_norm(a, b, backend=impl_name)  # noqa: E731

    def fn():
        if backward:
            x.grad = w.grad = None
            impl(x, w).backward(g)
        else:
            with torch.no_grad():
                impl(x, w)
        torch.cuda.synchronize()

    passes = 5 if backward else 2
    measure(benchmark, fn, group=f"gpu rms_norm {'fwd+bwd' if backward else 'fwd'} {dtype_name} {ROWS * 4}x{HIDDEN}",
            label=f"fmk-{impl_name}" if impl_name != "torch" else "torch F.rms_norm",
            nbytes=passes * x.numel() * x.element_size(), peak="gpu_mem_gbs", peer=impl_name == "torch", rounds=20)
