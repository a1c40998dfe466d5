import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.ops.linear import matmul_nt, matmul_tn, onednn_missing

BACKENDS = T.available_backends("linear", "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,K,N", [((1,), 1, 1), ((7,), 40, 33), ((2, 97), 64, 130), ((3, 5, 17), 384, 1152)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_reference(backend, shape, K, N, bias):
    x = T.randn(*shape, K, seed=K + N)
    w = T.randn(N, K, seed=N) / K**0.5
    b = T.randn(N, seed=3) if bias else None
    leaves = {n: [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
              for n in ("ref", "base", "out")}
    ref = F.linear(*[t.double() if t is not None else None for t in leaves["ref"]])
    base = F.linear(*leaves["base"])
    out = fk.linear(*leaves["out"], backend=backend)
    assert out.shape == (*shape, N) and out.dtype == torch.float32
    T.assert_close_to_reference(out, ref, base, name=f"{backend} y")
    g = T.randn(*shape, N, seed=11)
    for name, y in (("ref", ref), ("base", base), ("out", out)):
        y.backward(g.to(y.dtype))
    for i, arg in enumerate(("dx", "dw", "db")):
        if leaves["out"][i] is None:
            continue
        T.assert_close_to_reference(leaves["out"][i].grad, leaves["ref"][i].grad, leaves["base"][i].grad,
                                    name=f"{backend} {arg}", dtype=torch.float32)


def test_linear_noncontiguous_and_frozen_weight():
    x = T.randn(64, 3, 48, seed=1).transpose(0, 1)  # (3, 64, 48), not contiguous
    w = T.randn(80, 96, seed=2)[:, ::2]  # (80, 48), strided
    xr = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    ref, out = F.linear(xr.double(), w.double()), fk.linear(xo, w)
    T.assert_close_to_reference(out, ref, F.linear(x, w), name="y")
    g = T.randn(3, 64, 80, seed=4)
    ref.backward(g.double())
    out.backward(g)
    assert w.grad is None
    T.assert_close_to_reference(xo.grad, xr.grad, torch.mm(g.reshape(-1, 80), w).view(3, 64, 48), name="dx")


def test_linear_dispatch():
    q = fk._dispatch.Query(device="cpu", dtype=torch.float32, shape=(6, 8), extra=(("autocast", False),))
    chosen = fk._dispatch.OPS["linear"].select(q).name
    assert chosen == ("cpu" if onednn_missing() is None else "reference")
    q16 = fk._dispatch.Query(device="cpu", dtype=torch.bfloat16, shape=(6, 8), extra=(("autocast", False),))
    assert fk._dispatch.OPS["linear"].select(q16).name == "reference"
    qac = fk._dispatch.Query(device="cpu", dtype=torch.float32, shape=(6, 8), extra=(("autocast", True),))
    assert fk._dispatch.OPS["linear"].select(qac).name == "reference"


def test_linear_under_autocast_runs_bf16():
    x, w = T.randn(4, 8), T.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fk.linear(x, w)
    assert y.dtype == torch.bfloat16


def test_matmul_nt():
    a, b = T.randn(33, 20, seed=1), T.randn(17, 20, seed=2)
    T.assert_close_to_reference(matmul_nt(a, b), a.double() @ b.double().t(), a @ b.t(), name="a b^T")


def test_linear_module_is_a_drop_in_nn_linear():
    torch.manual_seed(0)
    ours = fk.nn.Linear(16, 8)
    theirs = nn.Linear(16, 8)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and set(ours.state_dict()) == {"weight", "bias"}
    x = T.randn(5, 16)
    T.assert_close_to_reference(ours(x), F.linear(x.double(), ours.weight.double(), ours.bias.double()), theirs(x))


@pytest.mark.parametrize("bad", ["dtype", "shape", "bias", "rank"])
def test_linear_bad_input(bad):
    x, w, b = T.randn(4, 8), T.randn(6, 8), T.randn(6)
    if bad == "dtype":
        with pytest.raises(TypeError, match="weight"):
            fk.linear(x, w.double())
    elif bad == "shape":
        with pytest.raises(ValueError, match="weight"):
            fk.linear(x, T.randn(6, 9))
    elif bad == "bias":
        with pytest.raises(ValueError, match="bias"):
            fk.linear(x, w, T.randn(5))
    else:
        with pytest.raises(ValueError, match="weight"):
            fk.linear(x, w[0])


def test_linear_under_autocast_mixed_dtypes():
    x, w = T.randn(4, 8).bfloat16(), T.randn(6, 8)  # a bf16 activation meets an fp32 weight, as in a model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fk.linear(x, w)
        z = fk.nn.Linear(6, 3)(y)
    assert y.dtype == z.dtype == torch.bfloat16


# a (T, N), b (T, K) -> a.T b: tails in every direction (N % 12, K % 32 and % 16), one row, empty reduction.
TN_SHAPES = [(1, 1, 1), (5, 13, 17), (64, 12, 32), (97, 37, 45), (200, 25, 70), (384, 100, 48), (1, 30, 100),
             (193, 12, 16), (0, 7, 9), (300, 14, 300), (64, 5, 200),  # N < 12: k split
             (150, 13, 600)]  # K > 512: 256-column blocks with a tail


@pytest.mark.parametrize("Tn,N,K", TN_SHAPES)
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_matmul_tn_matches_reference(Tn, N, K, accumulate):
    a, b = T.randn(Tn, N, seed=Tn + N), T.randn(Tn, K, seed=K)
    init = T.randn(N, K, seed=5)
    out = matmul_tn(a, b, out=init.clone(), accumulate=accumulate)
    ref = a.double().t() @ b.double() + (init.double() if accumulate else 0)
    base = a.t() @ b + (init if accumulate else 0)
    T.assert_close_to_reference(out, ref, base, name="matmul_tn")
    if not accumulate:
        T.assert_close_to_reference(matmul_tn(a, b), ref, base, name="matmul_tn (new out)")


def test_matmul_tn_strided_rows_and_out():
    wide_a, wide_b = T.randn(150, 70, seed=1), T.randn(150, 90, seed=2)
    a, b = wide_a[:, 3:40], wide_b[:, 5:66]  # row strides 70 and 90, unit last stride
    out_wide = torch.full((37, 100), 7.0)
    out = out_wide[:, 10:71]
    matmul_tn(a, b, out=out)
    ref = a.double().t() @ b.double()
    T.assert_close_to_reference(out, ref, a.t() @ b, name="strided matmul_tn")
    assert (out_wide[:, :10] == 7.0).all() and (out_wide[:, 71:] == 7.0).all()  # nothing written outside out


def test_matmul_tn_other_dtypes_and_layouts_fall_back():
    a, b = T.randn(33, 20, seed=1), T.randn(33, 24, seed=2)
    ref = a.double().t() @ b.double()
    T.assert_close_to_reference(matmul_tn(a.t().contiguous().t(), b), ref, a.t() @ b, name="column-major a")
    out = matmul_tn(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.bfloat16
    T.assert_close_to_reference(out, ref, a.bfloat16().t() @ b.bfloat16(), name="bf16", dtype=torch.bfloat16)


@pytest.mark.skipif(not fk._ext.has_cpu_ext(), reason="needs the CPU extension")
def test_mm_tn_op_rejects_bad_input():
    a, b, out = torch.randn(8, 4), torch.randn(8, 5), torch.empty(4, 5)
    with pytest.raises(RuntimeError, match="same number of rows"):
        torch.ops.fmkernels.mm_tn_(out, a, torch.randn(7, 5), False)
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.fmkernels.mm_tn_(torch.empty(5, 4), a, b, False)
    with pytest.raises(RuntimeError, match="a must be a 2-D fp32"):
        torch.ops.fmkernels.mm_tn_(out, a.double(), b, False)
    with pytest.raises(RuntimeError, match="unit last-dim stride"):
        torch.ops.fmkernels.mm_tn_(out, a, torch.randn(5, 8).t(), False)
