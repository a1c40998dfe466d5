import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.reference.swiglu import swiglu as swiglu_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = T.available_backends("swiglu", "cpu")


def _check(backend, rows, F_, dtype, packed):
    ab = T.randn(rows, 2 * F_, dtype=dtype, seed=rows + F_) * 3
    leaves = {n: ab.detach().clone().requires_grad_(True) for n in ("ref", "base", "out")}

    def split(t):
        return t[..., :F_], t[..., F_:]

    ref = swiglu_ref(*split(leaves["ref"].float()))
    a, b = split(leaves["base"])
    base = F.silu(a) * b
    out = fk.swiglu(leaves["out"], backend=backend) if packed else fk.swiglu(*split(leaves["out"]), backend=backend)
    assert out.shape == (rows, F_) and out.dtype == dtype
    T.assert_close_to_reference(out, ref, base, name=f"{backend} y")
    g = T.randn(rows, F_, seed=5)
    ref.backward(g)
    base.backward(g.to(dtype))
    out.backward(g.to(dtype))
    T.assert_close_to_reference(leaves["out"].grad, leaves["ref"].grad, leaves["base"].grad, name=f"{backend} d(ab)",
                                dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,F_", [(1, 8), (7, 96), (97, 40), (1025, 17), (3, 4097)])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "a_b"])
def test_swiglu_matches_reference(backend, dtype, rows, F_, packed):
    if backend == "triton" and (dtype == torch.bfloat16 or rows * F_ > 10000):
        pytest.skip("interpreter: small shapes only; bf16 arithmetic is wrong under TRITON_INTERPRET")
    _check(backend, rows, F_, dtype, packed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_separate_tensors_and_leading_dims(backend):
    a = T.randn(2, 5, 33).requires_grad_(True)
    b = T.randn(2, 5, 33, seed=1).requires_grad_(True)
    y = fk.swiglu(a, b, backend=backend)
    torch.testing.assert_close(y, F.silu(a) * b, rtol=1e-5, atol=1e-6)
    ga, gb = torch.autograd.grad(y.sum(), (a, b))
    ra, rb = torch.autograd.grad((F.silu(a) * b).sum(), (a, b))
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_swiglu_cpu_portable_fallback(monkeypatch):
    monkeypatch.setenv("FMK_CPU_ISA", "portable")
    for dtype in DTYPES:
        _check("cpu", 7, 97, dtype, True)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_swiglu_extreme_inputs():
    a = torch.tensor([[-1000.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1000.0]])
    b = torch.ones_like(a)
    y = fk.swiglu(a, b, backend="cpu")
    torch.testing.assert_close(y, F.silu(a), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(y).all()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_swiglu_opcheck():
    for dtype in DTYPES:
        a = T.randn(7, 40, dtype=dtype).requires_grad_(True)
        b = T.randn(7, 40, dtype=dtype, seed=1).requires_grad_(True)
        torch.library.opcheck(torch.ops.fmkernels.swiglu_fwd.default, (a, b))
        torch.library.opcheck(torch.ops.fmkernels.swiglu_bwd.default, (torch.randn(7, 40, dtype=dtype), a.detach(), b.detach()))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not importable")
def test_swiglu_triton_opcheck():
    from fmkernels.ops.swiglu import triton_module

    triton_module()  # registers the op, with the backward of fmkernels/ops/swiglu.py

    a = T.randn(5, 24).requires_grad_(True)
    b = T.randn(5, 24, seed=1).requires_grad_(True)
    torch.library.opcheck(torch.ops.fmkernels.swiglu_fwd_triton.default, (a, b))


class TestBadInput:
    def test_odd_packed(self):
        with pytest.raises(ValueError, match="packed input ab must have an even last dim"):
            fk.swiglu(torch.ones(3, 5))

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"b must have a's shape \(3, 4\)"):
            fk.swiglu(torch.ones(3, 4), torch.ones(3, 5))

    def test_dtype(self):
        with pytest.raises(TypeError, match="ab must have dtype"):
            fk.swiglu(torch.ones(3, 4, dtype=torch.long))
