import os

import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.reference.rms_norm import rms_norm as rms_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_BACKENDS = T.available_backends("rms_norm", "cpu")


def _baseline(x, w, eps):
    """Plain PyTorch in the input's own precision: the yardstick for the error budget."""
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _check(backend, rows, hidden, dtype, with_weight=True, noncontig=False, eps=1e-6):
    x = T.randn(rows, hidden, dtype=dtype, seed=rows + hidden) * 3
    w = T.randn(hidden, dtype=dtype, seed=1) if with_weight else None
    if noncontig:
        x = T.non_contiguous(x)
    xr = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    xk = x.detach().clone().requires_grad_(True)
    wr = w.detach().float().clone().requires_grad_(True) if w is not None else None
    wb = w.detach().clone().requires_grad_(True) if w is not None else None
    wk = w.detach().clone().requires_grad_(True) if w is not None else None

    ref = rms_ref(xr.float(), wr, eps)  # fp32 oracle on the same (rounded) inputs
    base = _baseline(xb, wb, eps)
    out = fk.rms_norm(xk, wk, eps, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    T.assert_close_to_reference(out, ref, base, name=f"{backend} y")

    g = T.randn(rows, hidden, seed=7)
    ref.backward(g)
    base.backward(g.to(dtype))
    out.backward(g.to(dtype))
    T.assert_close_to_reference(xk.grad, xr.grad, xb.grad, name=f"{backend} dx", dtype=dtype)
    if w is not None:
        T.assert_close_to_reference(wk.grad, wr.grad, wb.grad, name=f"{backend} dw", dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 96), (1025, 96), (7, 4097), (97, 8)])
def test_rms_norm_matches_reference(backend, dtype, rows, hidden):
    if backend == "triton" and (rows * hidden > 200_000 or dtype == torch.bfloat16):
        pytest.skip("interpreter: small shapes only; bf16 arithmetic is wrong under TRITON_INTERPRET")
    _check(backend, rows, hidden, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rms_norm_no_weight_and_noncontiguous(backend):
    _check(backend, 33, 96, torch.float32, with_weight=False)
    _check(backend, 33, 96, torch.float32, noncontig=True)


def test_rms_norm_leading_dims_and_empty():
    x = T.randn(2, 3, 5, 64)
    w = T.randn(64, seed=2)
    torch.testing.assert_close(fk.rms_norm(x, w), rms_ref(x, w), rtol=1e-5, atol=1e-5)
    empty = torch.empty(0, 64)
    assert fk.rms_norm(empty, w).shape == (0, 64)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="CPU extension not built")
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_rms_norm_cpu_portable_fallback(isa, monkeypatch):
    """The non-AVX-512 path (what a CPU without AVX-512 runs) against the reference."""
    monkeypatch.setenv("FMK_CPU_ISA", isa)
    assert fk._ext.cpu_ext().isa() in ("portable", "avx2")
    for dtype in DTYPES:
        _check("cpu", 7, 4097, dtype)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="CPU extension not built")
def test_rms_norm_cpu_backward_deterministic():
    x = T.randn(513, 257).requires_grad_(True)
    w = T.randn(257, seed=3).requires_grad_(True)
    g = T.randn(513, 257, seed=4)
    grads = []
    for _ in range(2):
        y = fk.rms_norm(x, w, backend="cpu")
        grads.append(torch.autograd.grad(y, (x, w), g))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="CPU extension not built")
def test_rms_norm_opcheck():
    for dtype in DTYPES:
        x = T.randn(7, 96, dtype=dtype).requires_grad_(True)
        w = T.randn(96, dtype=dtype, seed=1).requires_grad_(True)
        torch.library.opcheck(torch.ops.fmkernels.rms_norm_fwd.default, (x, w, 1e-6))
        torch.library.opcheck(torch.ops.fmkernels.rms_norm_fwd.default, (x.detach(), None, 1e-6))
        y, rstd = torch.ops.fmkernels.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
        torch.library.opcheck(
            torch.ops.fmkernels.rms_norm_bwd.default, (torch.randn_like(y), x.detach(), w.detach(), rstd, True)
        )


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not importable")
def test_rms_norm_triton_opcheck():
    from fmkernels.ops.rms_norm import triton_module

    triton_module()  # registers the op, with the backward of fmkernels/ops/rms_norm.py

    x = T.randn(7, 40).requires_grad_(True)
    w = T.randn(40, seed=1).requires_grad_(True)
    torch.library.opcheck(torch.ops.fmkernels.rms_norm_fwd_triton.default, (x, w, 1e-6))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="CPU extension not built")
def test_rms_norm_torch_compile_fullgraph():
    x = T.randn(16, 64).requires_grad_(True)
    w = T.randn(64, seed=1).requires_grad_(True)
    f = torch.compile(lambda a, b: fk.rms_norm(a, b).sum(), fullgraph=True, backend="aot_eager")
    eager = fk.rms_norm(x, w).sum()
    torch.testing.assert_close(f(x, w), eager)
    ga = torch.autograd.grad(f(x, w), (x, w))
    gb = torch.autograd.grad(eager, (x, w))
    torch.testing.assert_close(ga, gb)


class TestBadInput:
    def test_wrong_dtype(self):
        with pytest.raises(TypeError, match=r"x must have dtype float32 or bfloat16 or float16, got int64"):
            fk.rms_norm(torch.ones(3, 4, dtype=torch.long), None)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            fk.rms_norm([1.0, 2.0], None)

    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(4,\).*got \(5,\)"):
            fk.rms_norm(torch.ones(3, 4), torch.ones(5))

    def test_weight_rank(self):
        with pytest.raises(ValueError, match=r"weight must be 1-D"):
            fk.rms_norm(torch.ones(3, 4), torch.ones(1, 4))

    def test_scalar_input(self):
        with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
            fk.rms_norm(torch.tensor(1.0), None)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
            fk.rms_norm(torch.ones(3, 4), torch.ones(4, device="meta"))

    def test_negative_eps(self):
        with pytest.raises(ValueError, match="eps must be a non-negative float"):
            fk.rms_norm(torch.ones(3, 4), None, eps=-1.0)

    def test_unknown_backend(self):
        with pytest.raises(fk.BackendError, match="'nope' is not a backend"):
            fk.rms_norm(torch.ones(3, 4), None, backend="nope")

    def test_forced_backend_that_cannot_run_lists_all(self):
        with pytest.raises(fk.BackendError) as e:
            fk.rms_norm(torch.ones(3, 4), None, backend="cuda")
        msg = str(e.value)
        for name in ("cuda", "triton", "cpu", "reference"):
            assert f"- {name}:" in msg
        assert "runs on cuda tensors, got cpu" in msg


class TestModule:
    @pytest.mark.parametrize("affine", [True, False])
    def test_drop_in_for_torch_rmsnorm(self, affine):
        torch_m = torch.nn.RMSNorm(96, eps=1e-5, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                torch_m.weight.copy_(T.randn(96, seed=5))
        ours = fk.nn.RMSNorm(96, eps=1e-5, elementwise_affine=affine)
        ours.load_state_dict(torch_m.state_dict())
        assert set(ours.state_dict()) == set(torch_m.state_dict())
        x = T.randn(4, 9, 96)
        torch.testing.assert_close(ours(x), torch_m(x), rtol=1e-5, atol=1e-5)

    def test_default_eps_and_multi_dim_shape(self):
        torch_m = torch.nn.RMSNorm((6, 8))
        ours = fk.nn.RMSNorm((6, 8))
        x = T.randn(3, 6, 8)
        torch.testing.assert_close(ours(x), torch_m(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"trailing shape must be \(6, 8\)"):
            ours(T.randn(3, 8, 6))

    def test_from_torch_shares_weight(self):
        torch_m = torch.nn.RMSNorm(16)
        ours = fk.nn.RMSNorm.from_torch(torch_m)
        assert ours.weight is torch_m.weight


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("FMK_BACKEND", "reference")
    q = fk._dispatch.Query(device="cpu", dtype=torch.float32)
    assert fk._dispatch.OPS["rms_norm"].select(q).name == "reference"
    monkeypatch.setenv("FMK_BACKEND", "bogus")
    with pytest.raises(fk.BackendError, match="FMK_BACKEND='bogus' is not a backend"):
        fk.rms_norm(torch.ones(2, 4), None)


def test_auto_dispatch_prefers_cpu_kernel():
    if os.environ.get("FMK_BACKEND"):
        pytest.skip("FMK_BACKEND forces a backend")
    q = fk._dispatch.Query(device="cpu", dtype=torch.float32)
    expected = "cpu" if fk._ext.has_cpu_ext() else "reference"
    assert fk._dispatch.OPS["rms_norm"].select(q).name == expected


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 8), (1025, 96), (97, 4097), (4096, 4096)])
def test_rms_norm_gpu_backends(backend, dtype, rows, hidden):
    if backend not in T.available_backends("rms_norm", "cuda", dtype):
        pytest.skip(f"{backend} backend not available on CUDA")
    x = T.randn(rows, hidden, dtype=dtype, device="cuda", seed=rows) * 3
    w = T.randn(hidden, dtype=dtype, device="cuda", seed=1)
    xk, wk = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xr, wr = x.float().clone().requires_grad_(True), w.float().clone().requires_grad_(True)
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out, ref, base = fk.rms_norm(xk, wk, backend=backend), rms_ref(xr, wr), _baseline(xb, wb, 1e-6)
    T.assert_close_to_reference(out, ref, base, name=f"{backend} y")
    g = torch.randn_like(ref)
    for t, gg in ((out, g.to(dtype)), (ref, g), (base, g.to(dtype))):
        t.backward(gg)
    T.assert_close_to_reference(xk.grad, xr.grad, xb.grad, name=f"{backend} dx", dtype=dtype)
    T.assert_close_to_reference(wk.grad, wr.grad, wb.grad, name=f"{backend} dw", dtype=dtype)
