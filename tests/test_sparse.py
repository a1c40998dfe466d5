"""2:4 and block-sparse ops: formats, every backend vs the reference, odd shapes, gradients, opcheck, bad input."""
import pytest
import torch

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.ops import sparse as S
from fmkernels.reference import sparse as R
from fmkernels.sparsity import pruning as P

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
S24_BACKENDS = T.available_backends("sparse24_mm", "cpu")
BSR_BACKENDS = T.available_backends("bsr_mm", "cpu")
I8_BACKENDS = T.available_backends("sparse24_int8_mm", "cpu", torch.int8)


def _w24(N, K, dtype=torch.float32, seed=0):
    v, m = fk.compress_24(T.randn(N, K, seed=seed), prune=True)
    return v.to(dtype), m


def _small(backend, M, N, K):
    return backend != "triton" or M * N * K <= 300_000


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("N,K", [(1, 4), (3, 8), (5, 36), (16, 100), (7, 4096)])
def test_compress_24_roundtrip_exact(N, K):
    w = T.randn(N, K, seed=N + K)
    w = w * P.mask_24(w.abs())  # a 2:4 matrix
    w[0, :4] = 0.0  # an all-zero group
    v, m = fk.compress_24(w)
    assert v.shape == (N, K // 2) and m.shape == (N, (K + 31) // 32) and m.dtype == torch.int32
    assert torch.equal(fk.decompress_24(v, m), w)
    v2, m2 = fk.compress_24(fk.decompress_24(v, m))
    assert torch.equal(v, v2) and torch.equal(m, m2)


def test_compress_24_keeps_positions_of_zero_values():
    w = torch.tensor([[0.0, 5.0, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0]])
    v, m = fk.compress_24(w)
    assert torch.equal(fk.decompress_24(v, m), w)
    assert R.sparse24_columns(m, 8).tolist() == [[1, 3, 4, 6]]  # the non-zeros, then the lowest free position


def test_compress_24_int8_and_bf16_roundtrip():
    for dtype in (torch.bfloat16, torch.int8):
        w = (T.randn(8, 64, seed=3) * 50).to(dtype)
        v, m = fk.compress_24(w, prune=True)
        d = fk.decompress_24(v, m)
        assert d.dtype == dtype and fk.is_24_sparse(d)
        assert torch.equal(fk.compress_24(d)[0], v)


def test_compress_24_rejects_dense_with_clear_error():
    w = torch.ones(4, 8)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: 8 groups .* row 0, columns 0..3.*prune=True"):
        fk.compress_24(w)
    v, m = fk.compress_24(w, prune=True)  # or prunes when asked: the 2 largest, ties to the lower position
    assert R.sparse24_columns(m, 8)[0].tolist() == [0, 1, 4, 5]


def test_compress_24_prune_keeps_largest():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 0.3]])
    v, m = fk.compress_24(w, prune=True)
    assert torch.equal(fk.decompress_24(v, m), torch.tensor([[0.0, -4.0, 3.0, 0.0, 0.5, 0.0, 0.0, 0.3]]))


@pytest.mark.parametrize("K", [6, 10, 33])
def test_compress_24_rejects_k_not_multiple_of_4(K):
    with pytest.raises(ValueError, match=rf"K={K}\) must be a multiple of 4"):
        fk.compress_24(torch.zeros(2, K))


@pytest.mark.parametrize("b", [16, 32, 64])
def test_bsr_roundtrip_exact(b):
    N, K = 2 * b, 4 * b
    w = T.randn(N, K, seed=b)
    bm = torch.rand(N // b, K // b, generator=T.seeded(b)) < 0.5
    bm[0, 0] = True
    w = w * P.expand_block_mask(bm, b)
    blocks, rp, ci = fk.compress_bsr(w, b)
    assert blocks.shape == (int(bm.sum()), b, b) and rp.dtype == ci.dtype == torch.int32
    assert torch.equal(fk.decompress_bsr(blocks, rp, ci, K), w)


def test_bsr_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"multiple of block_size=32"):
        fk.compress_bsr(torch.zeros(64, 48), 32)
    with pytest.raises(ValueError, match=r"block_size must be one of \(16, 32, 64\), got 8"):
        fk.compress_bsr(torch.zeros(64, 64), 8)
    blocks, rp, ci = fk.compress_bsr(torch.ones(32, 64), 32)
    with pytest.raises(ValueError, match=r"K=48 must be a multiple of the block size 32"):
        fk.bsr_mm(torch.ones(3, 48), blocks, rp, ci)


# ---------------------------------------------------------------- 2:4 matmul vs reference


def _check_s24(backend, M, N, K, dtype, bias=True, noncontig=False):
    v, m = _w24(N, K, dtype, seed=M + N + K)
    x = T.randn(M, K, dtype=dtype, seed=M)
    if noncontig:
        x = T.non_contiguous(x)
    b = T.randn(N, dtype=dtype, seed=2) if bias else None
    ref = R.sparse24_mm(x.float(), v.float(), m, b.float() if bias else None)
    base = torch.nn.functional.linear(x, fk.decompress_24(v, m), b)  # plain PyTorch in dtype
    out = fk.sparse24_mm(x, v, m, b, backend=backend)
    assert out.dtype == dtype and out.shape == (M, N)
    T.assert_close_to_reference(out, ref, base, name=f"{backend} {dtype} y")


@pytest.mark.parametrize("backend", S24_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 8, 4), (7, 24, 36), (1, 64, 1028), (7, 33, 4096), (97, 40, 256), (1025, 24, 64)])
def test_sparse24_mm_matches_reference(backend, dtype, M, N, K):
    if not _small(backend, M, N, K) or (backend == "triton" and dtype == torch.bfloat16):
        pytest.skip("interpreter: small shapes only; bf16 arithmetic is wrong under TRITON_INTERPRET")
    _check_s24(backend, M, N, K, dtype)


@pytest.mark.parametrize("backend", S24_BACKENDS)
@pytest.mark.parametrize("M", [9, 11, 12, 16, 65, 130])  # both CPU kernels (stream: M < 12, outer: M >= 12)
def test_sparse24_mm_kernel_switch_and_noncontiguous(backend, M):
    if not _small(backend, M, 40, 96):
        pytest.skip("interpreter: small shapes only")
    _check_s24(backend, M, 40, 96, torch.float32, bias=False, noncontig=True)


@pytest.mark.skipif("cpu" not in S24_BACKENDS, reason="CPU extension not built")
@pytest.mark.parametrize("kernel", ["stream", "outer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_mm_each_cpu_kernel(kernel, dtype, monkeypatch):
    # every panel width of the outer kernel (M % 64 in 1..16, 17..32, 33..48, 49..64), 4-row and 2-row W groups
    # with leftover rows (N = 30), a partial last meta word (K = 100) and a multi-block K (K = 612)
    monkeypatch.setenv("FMK_SPARSE24_KERNEL", kernel)
    for M, N, K in [(1, 30, 100), (5, 30, 612), (20, 30, 100), (40, 30, 612), (64, 30, 100), (113, 30, 612)]:
        _check_s24("cpu", M, N, K, dtype)


def test_sparse24_mm_leading_dims():
    v, m = _w24(16, 64)
    x = T.randn(2, 3, 64)
    torch.testing.assert_close(fk.sparse24_mm(x, v, m), R.sparse24_mm(x.reshape(6, 64), v, m).reshape(2, 3, 16))


@pytest.mark.parametrize("backend", I8_BACKENDS)
@pytest.mark.parametrize("M,N,K", [(1, 8, 4), (7, 12, 36), (5, 16, 132), (1025, 8, 64), (3, 20, 4096)])
def test_sparse24_int8_mm_exact(backend, M, N, K):
    if not _small(backend, M, N, K):
        pytest.skip("interpreter: small shapes only")
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=T.seeded(M))
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=T.seeded(K))
    v, m = fk.compress_24(w, prune=True)
    T.assert_exact(fk.sparse24_int8_mm(x, v, m, backend=backend), R.sparse24_int8_mm(x, v, m))


def test_sparse24_int8_extremes_exact():
    x = torch.full((3, 64), -128, dtype=torch.int8)
    v, m = fk.compress_24(torch.full((5, 64), -128, dtype=torch.int8), prune=True)
    for backend in I8_BACKENDS:
        T.assert_exact(fk.sparse24_int8_mm(x, v, m, backend=backend), R.sparse24_int8_mm(x, v, m))


# ---------------------------------------------------------------- BSR matmul vs reference


def _bsr(N, K, b, density, dtype=torch.float32, seed=0):
    w = T.randn(N, K, seed=seed)
    bm = torch.rand(N // b, K // b, generator=T.seeded(seed)) < density
    return [t if t.dtype == torch.int32 else t.to(dtype)
            for t in fk.compress_bsr(w, b, block_mask=bm)]


@pytest.mark.parametrize("backend", BSR_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,b,density", [(1, 16, 0.5), (7, 32, 0.2), (97, 64, 0.5), (1025, 16, 0.3), (50, 32, 0.0)])
def test_bsr_mm_matches_reference(backend, dtype, M, b, density):
    N, K = 4 * b, 8 * b
    if not _small(backend, M, N, K) or (backend == "triton" and dtype == torch.bfloat16):
        pytest.skip("interpreter: small shapes only; bf16 arithmetic is wrong under TRITON_INTERPRET")
    blocks, rp, ci = _bsr(N, K, b, density, dtype, seed=M)
    x = T.randn(M, K, dtype=dtype, seed=M)
    bias = T.randn(N, dtype=dtype, seed=4)
    ref = R.bsr_mm(x.float(), blocks.float(), rp, ci, bias.float())
    base = torch.nn.functional.linear(x, fk.decompress_bsr(blocks, rp, ci, K), bias)
    out = fk.bsr_mm(x, blocks, rp, ci, bias, backend=backend)
    assert out.dtype == dtype
    T.assert_close_to_reference(out, ref, base, name=f"{backend} bsr y")


# ---------------------------------------------------------------- gradients (fixed pattern)


@pytest.mark.parametrize("backend", S24_BACKENDS)
@pytest.mark.parametrize("M", [1, 7, 70])
def test_sparse24_mm_gradients(backend, M):
    N, K = 24, 64
    v0, m = _w24(N, K, seed=M)
    x0 = T.randn(M, K, seed=M + 1)
    b0 = T.randn(N, seed=3)
    g = T.randn(M, N, seed=5)
    grads = {}
    for name in ("ref", backend):
        x, v, b = (t.clone().requires_grad_(True) for t in (x0, v0, b0))
        y = R.sparse24_mm(x, v, m, b) if name == "ref" else fk.sparse24_mm(x, v, m, b, backend=backend)
        y.backward(g)
        grads[name] = (x.grad, v.grad, b.grad)
    assert grads[backend][1].shape == (N, K // 2)  # only the kept values get a gradient
    for r, o, n in zip(grads["ref"], grads[backend], ("dx", "dvalues", "dbias")):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=f"{backend} {n}")


@pytest.mark.parametrize("backend", BSR_BACKENDS)
def test_bsr_mm_gradients(backend):
    b, M = 16, 9
    blocks0, rp, ci = _bsr(3 * b, 5 * b, b, 0.5, seed=1)
    x0 = T.randn(M, 5 * b, seed=2)
    g = T.randn(M, 3 * b, seed=3)
    grads = {}
    for name in ("ref", backend):
        x, blk = x0.clone().requires_grad_(True), blocks0.clone().requires_grad_(True)
        y = R.bsr_mm(x, blk, rp, ci) if name == "ref" else fk.bsr_mm(x, blk, rp, ci, backend=backend)
        y.backward(g)
        grads[name] = (x.grad, blk.grad)
    for r, o, n in zip(grads["ref"], grads[backend], ("dx", "dblocks")):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=f"{backend} {n}")


SDDMM_BACKENDS = T.available_backends("sparse24_values_grad", "cpu")


@pytest.mark.parametrize("backend", SDDMM_BACKENDS)
@pytest.mark.parametrize("M,N,K", [(1, 16, 64), (7, 17, 36), (33, 20, 100)])
def test_sparse24_values_grad_matches_reference(backend, M, N, K):
    _, m = _w24(N, K, seed=K)
    gy, x = T.randn(M, N, seed=1), T.randn(M, K, seed=2)
    want = (gy.t() @ x).gather(1, R.sparse24_columns(m, K))  # dense grad of W at the kept columns
    got = S.sparse24_values_grad(gy, x, m, backend=backend)
    assert got.shape == (N, K // 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sparse24_values_grad_bad_input():
    _, m = _w24(16, 64)
    with pytest.raises(ValueError, match="grad_y"):
        S.sparse24_values_grad(T.randn(3, 16), T.randn(4, 64), m)
    with pytest.raises(ValueError, match="meta"):
        S.sparse24_values_grad(T.randn(4, 16), T.randn(4, 64), m[:8])


def test_sparse24_backward_resolves_on_cuda_tensors():
    """The 2:4 backward's values gradient has a backend for CUDA tensors (once a CPU-only kernel, so a 2:4 layer
    trained on a GPU ran the CUDA forward and failed in the backward); asked of the dispatcher, no GPU needed."""
    from fmkernels import _dispatch

    op = _dispatch.OPS["sparse24_values_grad"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        impl = op.select(_dispatch.Query(device="cuda", dtype=dtype, shape=(64, 128, 256)))
        assert impl.name in ("triton", "reference") and "cuda" in impl.devices
    # every forward backend of sparse24_mm and bsr_mm gets the one backward of fmkernels/ops/sparse.py
    from fmkernels import _autograd

    assert "fmkernels::sparse24_mm" in _autograd.BACKWARDS["sparse24_mm"].attached
    assert "fmkernels::bsr_mm" in _autograd.BACKWARDS["bsr_mm"].attached


def test_bsr_transpose_is_the_transpose():
    blocks, rp, ci = _bsr(64, 96, 16, 0.4, seed=7)
    tb, trp, tci = S.bsr_transpose(blocks, rp, ci, 96)
    assert torch.equal(R.decompress_bsr(tb, trp, tci, 64), R.decompress_bsr(blocks, rp, ci, 96).t())


# ---------------------------------------------------------------- opcheck, compile, fallbacks


@pytest.mark.skipif("cpu" not in S24_BACKENDS, reason="CPU extension not built")
def test_opcheck_cpu_ops():
    v, m = _w24(16, 64)
    x = T.randn(5, 64).requires_grad_(True)
    b = T.randn(16, seed=1).requires_grad_(True)
    torch.library.opcheck(torch.ops.fmkernels.sparse24_mm.default, (x, v.clone().requires_grad_(True), m, b))
    torch.library.opcheck(torch.ops.fmkernels.sparse24_mm.default, (x.detach().bfloat16(), v.bfloat16(), m, None))
    torch.library.opcheck(torch.ops.fmkernels.sparse24_sddmm.default, (T.randn(5, 16), x.detach(), m))
    xi = torch.randint(-128, 128, (5, 64), dtype=torch.int8)
    vi, mi = fk.compress_24(torch.randint(-128, 128, (16, 64), dtype=torch.int8), prune=True)
    torch.library.opcheck(torch.ops.fmkernels.sparse24_int8_mm.default, (xi, vi, mi))
    blocks, rp, ci = _bsr(32, 64, 16, 0.5)
    torch.library.opcheck(torch.ops.fmkernels.bsr_mm.default,
                          (x.detach(), blocks.clone().requires_grad_(True), rp, ci, None), )


@pytest.mark.skipif("triton" not in S24_BACKENDS, reason="triton not importable")
def test_opcheck_triton_ops():
    import fmkernels.triton.bsr_mm  # noqa: F401
    import fmkernels.triton.sparse24_mm  # noqa: F401

    v, m = _w24(16, 64)
    x = T.randn(5, 64)
    torch.library.opcheck(torch.ops.fmkernels.sparse24_mm_triton.default, (x, v, m, None),
                          test_utils=("test_schema", "test_faketensor"))
    blocks, rp, ci = _bsr(32, 64, 16, 0.5)
    torch.library.opcheck(torch.ops.fmkernels.bsr_mm_triton.default, (x, blocks, rp, ci, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpu" not in S24_BACKENDS, reason="CPU extension not built")
def test_torch_compile_fullgraph():
    v, m = _w24(16, 64)
    x = T.randn(5, 64)
    f = torch.compile(lambda a: fk.sparse24_mm(a, v, m).sum(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), fk.sparse24_mm(x, v, m).sum())


@pytest.mark.skipif("cpu" not in S24_BACKENDS, reason="CPU extension not built")
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_cpu_portable_fallback(isa, monkeypatch):
    monkeypatch.setenv("FMK_CPU_ISA", isa)
    for dtype in (torch.float32, torch.bfloat16):
        _check_s24("cpu", 7, 24, 100, dtype)
        _check_s24("cpu", 70, 24, 100, dtype)
    x = torch.randint(-128, 128, (7, 132), dtype=torch.int8)
    v, m = fk.compress_24(torch.randint(-128, 128, (9, 132), dtype=torch.int8), prune=True)
    T.assert_exact(fk.sparse24_int8_mm(x, v, m, backend="cpu"), R.sparse24_int8_mm(x, v, m))
    blocks, rp, ci = _bsr(64, 64, 32, 0.5)
    xx = T.randn(50, 64)
    torch.testing.assert_close(fk.bsr_mm(xx, blocks, rp, ci, backend="cpu"), R.bsr_mm(xx, blocks, rp, ci),
                               rtol=1e-4, atol=1e-4)
    gy = T.randn(7, 24, seed=9)
    xs = T.randn(7, 100)
    _, m24 = _w24(24, 100)
    torch.testing.assert_close(torch.ops.fmkernels.sparse24_sddmm(gy, xs, m24),
                               (gy.t() @ xs).gather(1, R.sparse24_columns(m24, 100)), rtol=1e-4, atol=1e-4)


class TestBadInput:
    def test_k_not_multiple_of_4(self):
        v, m = _w24(8, 64)
        with pytest.raises(ValueError, match=r"K=62\) must be a multiple of 4"):
            fk.sparse24_mm(torch.ones(2, 62), v, m)

    def test_values_shape(self):
        v, m = _w24(8, 64)
        with pytest.raises(ValueError, match=r"values must have shape \(N, K/2\) = \(N, 16\) for K=32"):
            fk.sparse24_mm(torch.ones(2, 32), v, m)

    def test_meta_dtype(self):
        v, m = _w24(8, 64)
        with pytest.raises(TypeError, match=r"meta must have dtype int32, got int64"):
            fk.sparse24_mm(torch.ones(2, 64), v, m.long())

    def test_dtype_mismatch(self):
        v, m = _w24(8, 64)
        with pytest.raises(TypeError, match=r"values must have x's dtype torch.bfloat16"):
            fk.sparse24_mm(torch.ones(2, 64, dtype=torch.bfloat16), v, m)

    def test_int8_needs_int8(self):
        v, m = _w24(8, 64)
        with pytest.raises(TypeError, match=r"x must have dtype int8, got float32"):
            fk.sparse24_int8_mm(torch.ones(2, 64), v, m)

    def test_forced_cuda_lists_reasons(self):
        v, m = _w24(8, 64)
        with pytest.raises(fk.BackendError, match=r"runs on cuda tensors, got cpu"):
            fk.sparse24_mm(torch.ones(2, 64), v, m, backend="cuda")


# ---------------------------------------------------------------- GPU (skipped without a CUDA device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (7, 200, 4096), (1025, 96, 320)])
def test_gpu_sparse24_and_bsr_match_reference(backend, dtype, M, N, K):
    if backend not in T.available_backends("sparse24_mm", "cuda", dtype, (M, N, K)):
        pytest.skip(f"{backend} not available on this GPU build")
    v, m = _w24(N, K, dtype, seed=M)
    x = T.randn(M, K, dtype=dtype, seed=M).cuda()
    v, m = v.cuda(), m.cuda()
    ref = R.sparse24_mm(x.float(), v.float(), m)
    base = torch.nn.functional.linear(x, fk.decompress_24(v, m))
    T.assert_close_to_reference(fk.sparse24_mm(x, v, m, backend=backend), ref, base, name=f"{backend} 2:4")
    blocks, rp, ci = (t.cuda() for t in _bsr(64, K, 32, 0.3, dtype, seed=M))
    ref = R.bsr_mm(x.float(), blocks.float(), rp, ci)
    base = torch.nn.functional.linear(x, fk.decompress_bsr(blocks, rp, ci, K))
    T.assert_close_to_reference(fk.bsr_mm(x, blocks, rp, ci, backend=backend), ref, base, name=f"{backend} bsr")
