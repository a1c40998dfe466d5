import pytest
import torch

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.models.plain import _apply_rope
from fmkernels.ops.rope import rope_cos_sin
from fmkernels.reference.rope import rope as rope_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = T.available_backends("rope", "cpu")
# (B, N, Hq, Hk, D): odd sequence lengths, GQA, head dims 8..128 incl. 40 / 80 / 96
SHAPES = [(1, 1, 1, 1, 8), (2, 7, 4, 2, 40), (1, 97, 3, 1, 64), (2, 33, 2, 2, 96), (1, 13, 4, 4, 80), (1, 5, 2, 1, 128)]


def _baseline(q, k, cos, sin):
    """Plain PyTorch rotate-half in the inputs' precision (the error yardstick)."""
    return (_apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2),
            _apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2))


def _check(backend, B, N, Hq, Hk, D, dtype, packed=True):
    qkv = T.randn(B, N, Hq + 2 * Hk, D, dtype=dtype, seed=N + D)
    cos, sin = rope_cos_sin(N + 3, D)
    if packed:  # strided views of one fused projection, as the model passes them
        q0, k0 = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk]
    else:
        q0, k0 = qkv[:, :, :Hq].contiguous(), qkv[:, :, Hq : Hq + Hk].contiguous()
    leaves = {}
    for name in ("ref", "base", "out"):
        leaves[name] = (q0.detach().clone().requires_grad_(True), k0.detach().clone().requires_grad_(True))
    rq, rk = rope_ref(leaves["ref"][0].float(), leaves["ref"][1].float(), cos, sin)
    bq, bk = _baseline(*leaves["base"], cos[:N], sin[:N])
    oq, ok = fk.rope(*leaves["out"], cos, sin, backend=backend)
    assert oq.dtype == dtype and oq.shape == q0.shape and ok.shape == k0.shape and oq.is_contiguous()
    T.assert_close_to_reference(oq, rq, bq, name=f"{backend} q")
    T.assert_close_to_reference(ok, rk, bk, name=f"{backend} k")
    gq, gk = T.randn(*q0.shape, seed=3), T.randn(*k0.shape, seed=4)
    torch.autograd.backward((rq, rk), (gq, gk))
    torch.autograd.backward((bq, bk), (gq.to(dtype), gk.to(dtype)))
    torch.autograd.backward((oq, ok), (gq.to(dtype), gk.to(dtype)))
    for i, n in enumerate(("dq", "dk")):
        T.assert_close_to_reference(leaves["out"][i].grad, leaves["ref"][i].grad, leaves["base"][i].grad,
                                    name=f"{backend} {n}", dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rope_matches_reference(backend, dtype, shape):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong under TRITON_INTERPRET")
    _check(backend, *shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_contiguous_inputs(backend):
    _check(backend, 2, 9, 2, 1, 16, torch.float32, packed=False)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_rope_cpu_portable_fallback(monkeypatch):
    monkeypatch.setenv("FMK_CPU_ISA", "portable")
    for dtype in DTYPES:
        _check("cpu", 2, 7, 4, 2, 40, dtype)


def test_rope_inverse_undoes_rotation():
    q, k = T.randn(1, 11, 2, 32), T.randn(1, 11, 1, 32, seed=1)
    cos, sin = rope_cos_sin(11, 32)
    rq, rk = fk.rope(q, k, cos, sin)
    bq, bk = torch.ops.fmkernels.rope(rq, rk, cos, sin, True) if fk._ext.has_cpu_ext() else rope_ref(rq, rk, cos, sin, True)
    torch.testing.assert_close(bq, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bk, k, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU extension not built")
def test_rope_opcheck():
    cos, sin = rope_cos_sin(7, 40)
    for dtype in DTYPES:
        q = T.randn(2, 7, 3, 40, dtype=dtype).requires_grad_(True)
        k = T.randn(2, 7, 1, 40, dtype=dtype, seed=1).requires_grad_(True)
        torch.library.opcheck(torch.ops.fmkernels.rope.default, (q, k, cos, sin, False))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not importable")
def test_rope_triton_opcheck():
    from fmkernels.ops.rope import triton_module

    triton_module()  # registers the op, with the backward of fmkernels/ops/rope.py

    cos, sin = rope_cos_sin(5, 16)
    q = T.randn(1, 5, 2, 16).requires_grad_(True)
    k = T.randn(1, 5, 1, 16, seed=1).requires_grad_(True)
    torch.library.opcheck(torch.ops.fmkernels.rope_triton.default, (q, k, cos, sin, False))


class TestBadInput:
    def test_odd_head_dim(self):
        with pytest.raises(ValueError, match="head dim .* must be even, got 5"):
            fk.rope(torch.ones(1, 2, 1, 5), torch.ones(1, 2, 1, 5), torch.ones(2, 2), torch.ones(2, 2))

    def test_k_shape(self):
        with pytest.raises(ValueError, match=r"k must have shape \(1, 2, Hk, 8\)"):
            fk.rope(torch.ones(1, 2, 1, 8), torch.ones(1, 3, 1, 8), torch.ones(2, 4), torch.ones(2, 4))

    def test_cos_too_short(self):
        with pytest.raises(ValueError, match=r"cos and sin must have shape \(>= 4, 4\)"):
            fk.rope(torch.ones(1, 4, 1, 8), torch.ones(1, 4, 1, 8), torch.ones(2, 4), torch.ones(2, 4))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="k must have q's dtype"):
            fk.rope(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8, dtype=torch.float16), torch.ones(2, 4), torch.ones(2, 4))

    def test_rank(self):
        with pytest.raises(ValueError, match="q must be 4-D"):
            fk.rope(torch.ones(2, 1, 8), torch.ones(1, 2, 1, 8), torch.ones(2, 4), torch.ones(2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 40), (1, 33, 3, 1, 64)], ids=lambda s: "x".join(map(str, s)))
def test_rope_qkv_packed_gradient(backend, dtype, shape):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong under TRITON_INTERPRET")
    B, N, Hq, Hk, D = shape
    cos, sin = rope_cos_sin(N, D)
    qkv0 = T.randn(B, N, Hq + 2 * Hk, D, dtype=dtype, seed=N)
    leaves = {n: qkv0.detach().clone().requires_grad_(True) for n in ("ref", "base", "out")}

    def split(t):
        return t[:, :, :Hq], t[:, :, Hq : Hq + Hk], t[:, :, Hq + Hk :]

    rq, rk = rope_ref(*[t.float() for t in split(leaves["ref"])[:2]], cos, sin)
    rv = split(leaves["ref"])[2].float()
    bq, bk = _baseline(*split(leaves["base"])[:2], cos, sin)
    bv = split(leaves["base"])[2]
    oq, ok, ov = fk.rope_qkv(leaves["out"], Hq, cos, sin, backend=backend)
    assert oq.shape == (B, N, Hq, D) and ok.shape == ov.shape == (B, N, Hk, D) and ov.dtype == dtype
    T.assert_close_to_reference(oq, rq, bq, name=f"{backend} q")
    T.assert_close_to_reference(ok, rk, bk, name=f"{backend} k")
    assert torch.equal(ov, split(qkv0)[2])
    g = [T.randn(*t.shape, seed=5 + i) for i, t in enumerate((oq, ok, ov))]
    torch.autograd.backward((rq, rk, rv), g)
    torch.autograd.backward((bq, bk, bv), [x.to(dtype) for x in g])
    torch.autograd.backward((oq, ok, ov), [x.to(dtype) for x in g])
    T.assert_close_to_reference(leaves["out"].grad, leaves["ref"].grad, leaves["base"].grad,
                                name=f"{backend} d(qkv)", dtype=dtype)


def test_rope_qkv_bad_heads():
    cos, sin = rope_cos_sin(4, 8)
    with pytest.raises(ValueError, match="n_q_heads"):
        fk.rope_qkv(T.randn(1, 4, 5, 8), 2, cos, sin)  # 3 remaining heads cannot split into k and v
