import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.reference.cross_entropy import cross_entropy_chunk
from fmkernels.reference.cross_entropy import linear_cross_entropy as lce_ref

BACKENDS = T.available_backends("linear_cross_entropy", "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(Tn, H, V, dtype, seed=0, ignore=True):
    x = T.randn(Tn, H, dtype=dtype, seed=seed)
    w = T.randn(V, H, dtype=dtype, seed=seed + 1, scale=0.5)
    g = torch.Generator().manual_seed(seed + 2)
    t = torch.randint(0, V, (Tn,), generator=g)
    if ignore and Tn > 2:
        t[1] = -100
    return x, w, t


def _check(backend, Tn, H, V, dtype, chunk=None, reduction="mean", bias=False):
    x, w, t = _inputs(Tn, H, V, dtype)
    b = T.randn(V, dtype=dtype, seed=9) if bias else None
    leaves = {}
    for n in ("ref", "base", "out"):
        leaves[n] = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        if bias:
            leaves[n].append(b.clone().requires_grad_(True))
    lr = leaves["ref"]
    ref = lce_ref(lr[0].float(), lr[1].float(), t, lr[2].float() if bias else None, reduction=reduction)
    lb = leaves["base"]
    base = F.cross_entropy(F.linear(lb[0], lb[1], lb[2] if bias else None).float(), t, reduction=reduction)
    lo = leaves["out"]
    out = fk.linear_cross_entropy(lo[0], lo[1], t, lo[2] if bias else None, reduction=reduction, chunk_size=chunk,
                                  backend=backend)
    assert out.dtype == torch.float32 and out.dim() == 0
    T.assert_close_to_reference(out, ref, base, name=f"{backend} loss", dtype=dtype)
    ref.backward()
    base.backward()
    out.backward()
    names = ["dx", "dw", "db"]
    for i in range(len(lo)):
        T.assert_close_to_reference(lo[i].grad, lr[i].grad, lb[i].grad, name=f"{backend} {names[i]}", dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Tn,H,V,chunk", [(1, 8, 8, None), (7, 16, 97, 3), (97, 40, 300, 32), (1025, 24, 129, None)])
def test_linear_cross_entropy_matches_reference(backend, dtype, Tn, H, V, chunk):
    if backend == "triton" and (dtype == torch.bfloat16 or Tn * V > 40000):
        pytest.skip("interpreter: small shapes only; bf16 arithmetic is wrong under TRITON_INTERPRET")
    _check(backend, Tn, H, V, dtype, chunk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_sum_bias_leading_dims(backend):
    _check(backend, 33, 16, 50, torch.float32, chunk=8, reduction="sum", bias=True)
    x, w, t = _inputs(12, 16, 40, torch.float32)
    a = fk.linear_cross_entropy(x.view(3, 4, 16), w, t.view(3, 4), backend=backend)
    torch.testing.assert_close(a, lce_ref(x, w, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_linear_cross_entropy_bf16_autocast(backend):
    x, w, t = _inputs(64, 32, 200, torch.float32)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fk.linear_cross_entropy(xs, ws, t, backend=backend, chunk_size=16)
        base = F.cross_entropy(F.linear(xb, wb).float(), t)
    ref = lce_ref(x, w, t)
    T.assert_close_to_reference(out, ref, base, name="autocast loss", dtype=torch.bfloat16)
    out.backward()
    assert xs.grad.dtype == torch.float32 and ws.grad.dtype == torch.float32
    base.backward()
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lce_ref(xr, wr, t).backward()
    T.assert_close_to_reference(xs.grad, xr.grad, xb.grad, name="autocast dx", dtype=torch.bfloat16)
    T.assert_close_to_reference(ws.grad, wr.grad, wb.grad, name="autocast dw", dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_chunk_kernel_in_place(backend):
    z = T.randn(9, 70, scale=4)
    t = torch.randint(0, 70, (9,), generator=torch.Generator().manual_seed(1))
    t[4] = -100
    loss_ref, grad_ref = cross_entropy_chunk(z, t, 0.25, -100)
    zz = z.clone()
    from fmkernels.ops import cross_entropy as ce_mod

    fn = {"cpu": ce_mod._ce_cpu, "triton": ce_mod._ce_triton, "reference": ce_mod._ce_reference}[backend]
    loss = fn(zz, t, 0.25, -100)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zz, grad_ref, rtol=1e-5, atol=1e-6)
    assert loss[4] == 0 and (zz[4] == 0).all()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_cpu_portable_fallback_and_extremes(monkeypatch):
    z = torch.tensor([[1000.0, -1000.0, 0.0, 5.0], [-50.0, -50.0, -50.0, -50.0]])
    t = torch.tensor([0, 2])
    for isa in ("avx512", "portable"):
        monkeypatch.setenv("FMK_CPU_ISA", isa)
        zz = z.clone()
        loss = torch.ops.fmkernels.ce_chunk_(zz, t, 1.0, -100)
        lref, gref = cross_entropy_chunk(z, t, 1.0, -100)
        torch.testing.assert_close(loss, lref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zz, gref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("FMK_CPU_ISA", "portable")
    _check("cpu", 97, 40, 300, torch.float32, 32)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_ce_chunk_opcheck():
    z = T.randn(5, 30)
    t = torch.randint(0, 30, (5,))
    torch.library.opcheck(torch.ops.fmkernels.ce_chunk_.default, (z, t, 0.5, -100))


def test_no_grad_eval_path():
    x, w, t = _inputs(20, 8, 30, torch.float32)
    with torch.no_grad():
        a = fk.linear_cross_entropy(x, w, t)
    torch.testing.assert_close(a, lce_ref(x, w, t), rtol=1e-5, atol=1e-6)


def test_deterministic():
    x, w, t = _inputs(300, 32, 500, torch.float32)
    outs = []
    for _ in range(2):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fk.linear_cross_entropy(xx, ww, t, chunk_size=64).backward()
        outs.append((xx.grad, ww.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


class TestBadInput:
    def test_target_shape(self):
        with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
            fk.linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.zeros(5, dtype=torch.long))

    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
            fk.linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 7), torch.zeros(4, dtype=torch.long))

    def test_target_dtype(self):
        with pytest.raises(TypeError, match="target must have dtype int64"):
            fk.linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.int32))

    def test_reduction(self):
        with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
            fk.linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.long), reduction="none")

    @pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
    def test_target_out_of_range(self):
        with pytest.raises(RuntimeError, match=r"target\[0\] = 10 is out of range"):
            fk.linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.full((4,), 10, dtype=torch.long),
                                    backend="cpu")


def test_linear_cross_entropy_fwd_opcheck():
    x, w, t = _inputs(37, 16, 50, torch.float32)
    b = T.randn(50, dtype=torch.float32, seed=9)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    args = (x, w, b, t, -100, True, 16, "reference", torch.float32, True, True, True)
    torch.library.opcheck(torch.ops.fmkernels.linear_cross_entropy_fwd.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_compiles_fullgraph(backend):
    """The fused loss is one opaque op: torch.compile(fullgraph=True) traces through it, and the compiled loss and
    gradients equal eager."""
    x, w, t = _inputs(40, 16, 50, torch.float32)

    def f(x, w):
        return fk.linear_cross_entropy(x * 2.0, w, t, chunk_size=16, backend=backend)

    torch._dynamo.reset()
    fc = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (f, fc):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xi, wi)
        loss.backward()
        outs.append((loss.detach(), xi.grad, wi.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
