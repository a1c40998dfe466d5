"""fmkernels.flash_attention_varlen vs a reference that runs each sequence on its own (and the padded-batch key
ranges of fmkernels.flash_attention), forward and gradients, odd shapes, bad inputs, determinism, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.reference.attention import attention_mask
from fmkernels.reference.attention_varlen import flash_attention_varlen as varlen_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = {dt: T.available_backends("flash_attention_varlen", "cpu", dt) for dt in DTYPES}
ALL_BACKENDS = sorted(set().union(*BACKENDS.values()))
HAS_CPU = "cpu" in BACKENDS[torch.float32]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


def _baseline(q, k, v, lens_q, lens_k, causal, window, scale):
    """Plain PyTorch SDPA per sequence in the inputs' own precision: the yardstick for the error budget."""
    left, right = window
    if causal:
        right = 0
    outs, q0, k0 = [], 0, 0
    for nq, nk in zip(lens_q, lens_k):
        if nq and nk:
            qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q[q0:q0 + nq], k[k0:k0 + nk], v[k0:k0 + nk]))
            mask = attention_mask(nq, nk, left, right)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
            outs.append(o[0].transpose(0, 1).nan_to_num(0.0))
        elif nq:
            outs.append(q[q0:q0 + nq] * 0)
        q0, k0 = q0 + nq, k0 + nk
    return torch.cat(outs, 0)


def _check(backend, lens_q, lens_k, Hq, Hkv, D, dtype, causal=False, window=(-1, -1), scale=None, seed=0):
    if backend not in BACKENDS[dtype]:
        pytest.skip(f"{backend} does not run {dtype} here")
    if backend == "triton":
        if dtype == torch.bfloat16:
            pytest.skip("interpreter: bf16 arithmetic is wrong under TRITON_INTERPRET")
        if sum(a * b for a, b in zip(lens_q, lens_k)) * Hq * max(D, 16) > 3 * 40 * 40 * 64:
            pytest.skip("interpreter: tiny shapes only")
    Tq, Tk = sum(lens_q), sum(lens_k)
    cq, ck = _cu(lens_q), _cu(lens_k)
    q = T.randn(Tq, Hq, D, dtype=dtype, seed=seed)
    k = T.randn(Tk, Hkv, D, dtype=dtype, seed=seed + 1)
    v = T.randn(Tk, Hkv, D, dtype=dtype, seed=seed + 2)
    (qk, kk, vk), (qb, kb, vb) = [[t.detach().clone().requires_grad_(True) for t in (q, k, v)] for _ in range(2)]
    qr, kr, vr = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    mq, mk = max(lens_q, default=0), max(lens_k, default=0)
    out, lse = fk.flash_attention_varlen(qk, kk, vk, cq, ck, mq, mk, causal=causal, window_size=window,
                                         softmax_scale=scale, return_lse=True, backend=backend)
    ref, lse_ref = varlen_ref(qr, kr, vr, cq, ck, causal=causal, window_size=window, softmax_scale=scale,
                              return_lse=True)
    base = _baseline(qb, kb, vb, lens_q, lens_k, causal, window, scale)
    assert out.dtype == dtype and out.shape == (Tq, Hq, D)
    assert lse.dtype == torch.float32 and lse.shape == (Hq, Tq)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    T.assert_close_to_reference(out, ref, base, name=f"{backend} out")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[fin], lse_ref[fin], rtol=1e-3 if dtype != torch.float32 else 1e-5, atol=1e-3)
    g = T.randn(Tq, Hq, D, seed=seed + 3)
    out.backward(g.to(dtype))
    ref.backward(g)
    base.backward(g.to(dtype))
    for name, a, r, b in (("dq", qk, qr, qb), ("dk", kk, kr, kb), ("dv", vk, vr, vb)):
        assert a.grad.dtype == dtype and a.grad.shape == a.shape
        assert not torch.isnan(a.grad).any(), f"{backend} {name}: NaN"
        bg = b.grad if b.grad is not None else torch.zeros_like(b)
        T.assert_close_to_reference(a.grad, r.grad, bg.nan_to_num(0.0), name=f"{backend} {name}", dtype=dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_basic_mixed_lengths(backend, dtype, causal):
    # single-token and empty sequences, a sequence over several key blocks, one not a multiple of the tile
    lens = [1, 0, 70, 5, 130, 1]
    _check(backend, lens, lens, 4, 4, 64, dtype, causal)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [8, 24, 40, 59, 96, 256])
def test_head_dims(backend, dtype, d):
    _check(backend, [33, 1, 66], [33, 1, 66], 2, 2, d, dtype, causal=True, seed=d)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 2)], ids=["gqa4", "gqa3"])
def test_gqa(backend, dtype, hq, hkv):
    _check(backend, [17, 80, 3], [17, 80, 3], hq, hkv, 32, dtype, causal=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [(16, 0), (8, 8), (-1, 4), (0, 0), (3, -1)], ids=str)
def test_window(backend, dtype, window):
    _check(backend, [150, 9, 0, 40], [150, 9, 0, 40], 2, 2, 32, dtype, window=window)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_q_shorter_than_k(backend, dtype, causal):
    # per sequence: q shorter than k (chunked prefill / decoding), a query with no keys, keys with no query
    _check(backend, [1, 20, 64, 3, 0, 7], [90, 20, 200, 0, 5, 16], 4, 2, 48, dtype, causal, scale=0.3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_q_longer_than_k_causal_rows_without_keys(backend):
    _check(backend, [10, 70], [4, 65], 2, 1, 16, torch.float32, causal=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (4, 2))],
                         ids=["full", "causal", "window"])
def test_small_all_backends(backend, dtype, causal, window):
    # shapes the Triton interpreter runs: empty, single-token, q shorter than k, several blocks of 16, GQA 3:1
    _check(backend, [1, 0, 20, 7, 3], [1, 2, 20, 33, 0], 3, 1, 24, dtype, causal, window)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_empty_and_single(backend):
    _check(backend, [0, 1, 0], [0, 1, 0], 1, 1, 8, torch.float32)


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_cpu_portable_fallback(isa, monkeypatch):
    """The non-AVX-512 path (what a CPU without AVX-512 runs) against the per-sequence reference."""
    monkeypatch.setenv("FMK_CPU_ISA", isa)
    assert fk._ext.cpu_ext().isa() in ("portable", "avx2")
    for dtype in DTYPES:
        _check("cpu", [70, 0, 1, 9], [70, 3, 1, 30], 4, 2, 40, dtype, causal=True)
        _check("cpu", [1, 33], [33, 33], 2, 2, 16, dtype, window=(5, 0))
        _check("cpu", [128, 64], [128, 64], 4, 2, 64, dtype, causal=True)  # whole key blocks: read in place


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lens", [[300], [64, 200, 1, 0, 90]], ids=["one-long", "mixed"])
def test_cpu_backward_deterministic(dtype, lens):
    # one sequence, one head: the backward splits keys into chunks with dq partials; mixed: dq written directly
    cu = _cu(lens)
    q = T.randn(sum(lens), 1, 64, dtype=dtype).requires_grad_(True)
    k = T.randn(sum(lens), 1, 64, dtype=dtype, seed=1).requires_grad_(True)
    v = T.randn(sum(lens), 1, 64, dtype=dtype, seed=2).requires_grad_(True)
    g = T.randn(sum(lens), 1, 64, dtype=dtype, seed=3)
    grads = []
    for _ in range(2):
        out = fk.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend="cpu")
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 2)], ids=["mha", "gqa4", "gqa3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_whole_block_sequences(dtype, hq, hkv, causal):
    # sequences of whole 64-key blocks: the CPU kernels read the packed rows in place (Q tiles, K / V blocks
    # gathered per tile, K re-paired per block, both Q / dO pair layouts from one pass, strided outputs streamed)
    _check("cpu", [128, 64, 192], [128, 64, 192], hq, hkv, 64, dtype, causal)
    # keys whole blocks, queries not (q shorter than k per sequence)
    _check("cpu", [100, 64, 30], [128, 64, 192], hq, hkv, 64, dtype, causal, seed=5)


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [96, 128])  # 128: whole key blocks, k / v read in place
def test_cpu_equal_lengths_match_dense(dtype, N):
    # B equal-length sequences packed = the dense kernel on (B, H, N, D): same tiles, same order of sums
    B, H, D = 3, 2, 64
    q, k, v = (T.randn(B, H, N, D, dtype=dtype, seed=s) for s in range(3))
    dense = fk.flash_attention(q, k, v, causal=True, backend="cpu")
    pack = lambda x: x.transpose(1, 2).reshape(B * N, H, D)  # noqa: E731
    cu = _cu([N] * B)
    out = fk.flash_attention_varlen(pack(q), pack(k), pack(v), cu, cu, N, N, causal=True, backend="cpu")
    assert torch.equal(out, pack(dense))
    g = T.randn(B, H, N, D, dtype=dtype, seed=7)
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    gd = torch.autograd.grad(fk.flash_attention(*leaves, causal=True, backend="cpu"), leaves, g)
    pl = [pack(x).detach().requires_grad_(True) for x in (q, k, v)]
    gv = torch.autograd.grad(fk.flash_attention_varlen(*pl, cu, cu, N, N, causal=True, backend="cpu"), pl, pack(g))
    for a, b in zip(gv, gd):
        assert torch.equal(a, pack(b))


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_opcheck(dtype):
    lens_q, lens_k = [3, 0, 9], [5, 2, 13]
    q = T.randn(sum(lens_q), 4, 40, dtype=dtype).requires_grad_(True)
    k = T.randn(sum(lens_k), 2, 40, dtype=dtype, seed=1).requires_grad_(True)
    v = T.randn(sum(lens_k), 2, 40, dtype=dtype, seed=2).requires_grad_(True)
    cq, ck = _cu(lens_q), _cu(lens_k)
    fwd = torch.ops.fmkernels.flash_attention_varlen_fwd.default
    torch.library.opcheck(fwd, (q, k, v, cq, ck, 9, 13, 0.2, -1, 0))
    torch.library.opcheck(fwd, (q.detach(), k.detach(), v.detach(), cq, ck, 9, 13, 0.2, 3, 2))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), cq, ck, 9, 13, 0.2, -1, 0)
    torch.library.opcheck(
        torch.ops.fmkernels.flash_attention_varlen_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cq, ck, 9, 13, 0.2, -1, 0),
    )


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
def test_cpu_torch_compile_fullgraph():
    lens = [5, 16, 1]
    cu = _cu(lens)
    q, k, v = (T.randn(sum(lens), 2, 32, seed=s).requires_grad_(True) for s in range(3))

    def f(a, b, c, cu):
        return fk.flash_attention_varlen(a, b, c, cu, cu, 16, 16, causal=True).sum()

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(q, k, v, cu)
    torch.testing.assert_close(g(q, k, v, cu), eager)
    torch.testing.assert_close(torch.autograd.grad(g(q, k, v, cu), (q, k, v)), torch.autograd.grad(eager, (q, k, v)))


# ------------------------------------------------------------------ bad input


def _inputs(lens=(3, 4)):
    t = sum(lens)
    return T.randn(t, 2, 16), T.randn(t, 2, 16, seed=1), T.randn(t, 2, 16, seed=2), _cu(list(lens))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda cu: cu.long(), "cu_seqlens_q must have dtype int32"),
        (lambda cu: cu.float(), "cu_seqlens_q must have dtype int32"),
        (lambda cu: cu.view(1, -1), "cu_seqlens_q must be 1-D"),
        (lambda cu: torch.tensor([0, 8, 7], dtype=torch.int32), "cu_seqlens_q must be non-decreasing"),
        (lambda cu: torch.tensor([1, 3, 7], dtype=torch.int32), "cu_seqlens_q must start at 0"),
        (lambda cu: torch.tensor([0, 3, 6], dtype=torch.int32), r"cu_seqlens_q\[-1\] must equal the total rows"),
        (lambda cu: torch.tensor([0, 3, 9], dtype=torch.int32), r"cu_seqlens_q\[-1\] must equal the total rows"),
        (lambda cu: torch.tensor([0, 3, 4, 7], dtype=torch.int32), "same length"),
        (lambda cu: "0,3,7", "cu_seqlens_q must be an int32 torch.Tensor"),
    ],
)
def test_bad_cu_seqlens_q(mutate, match):
    q, k, v, cu = _inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        fk.flash_attention_varlen(q, k, v, mutate(cu), cu, 4, 4)


def test_bad_cu_seqlens_k_and_max_seqlen():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        fk.flash_attention_varlen(q, k, v, cu, torch.tensor([0, 8, 7], dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the total rows k.shape\[0\] = 5, got 7"):
        fk.flash_attention_varlen(q, k[:5], v[:5], cu, cu, 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_q = 3 is smaller than the longest sequence"):
        fk.flash_attention_varlen(q, k, v, cu, cu, 3, 4)
    with pytest.raises(ValueError, match="max_seqlen_k = 2 is smaller"):
        fk.flash_attention_varlen(q, k, v, cu, cu, 4, 2)
    with pytest.raises(TypeError, match="max_seqlen_q must be a non-negative int"):
        fk.flash_attention_varlen(q, k, v, cu, cu, 4.0, 4)
    if torch.device("meta") != q.device:
        with pytest.raises(ValueError, match="cu_seqlens_k must be on q's device"):
            fk.flash_attention_varlen(q, k, v, cu, cu.to("meta"), 4, 4)


def test_bad_shapes():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="q must be 3-D"):
        fk.flash_attention_varlen(q.unsqueeze(0), k, v, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="multiple of k/v's head count"):
        fk.flash_attention_varlen(q[:, :1], k, v, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="head dim"):
        fk.flash_attention_varlen(q, k[..., :8], v[..., :8], cu, cu, 4, 4)


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
def test_cpu_op_refuses_bad_table_without_reading():
    # the op called directly (no Python validation): the kernel's own host check refuses, no out-of-bounds read
    q, k, v, cu = _inputs()
    bad = torch.tensor([0, 100, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.fmkernels.flash_attention_varlen_fwd(q, k, v, bad, bad, 100, 100, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        torch.ops.fmkernels.flash_attention_varlen_fwd(q, k, v, cu, cu, 2, 2, 0.25, -1, -1)


# ------------------------------------------------------------------ padded batches: seqused_k / seqstart_k

SEQ_BACKENDS = {dt: T.available_backends("flash_attention_seqused", "cpu", dt) for dt in DTYPES}


def _padded_mask(B, Nq, Nk, start, end, causal, window):
    left, right = window
    if causal:
        right = 0
    j = torch.arange(Nk)
    keys = ((j >= start.long()[:, None]) & (j < end.long()[:, None]))[:, None, None, :]  # (B, 1, 1, Nk)
    m = attention_mask(Nq, Nk, left, right)
    return keys if m is None else keys & m


@pytest.mark.parametrize("backend", sorted(set().union(*SEQ_BACKENDS.values())))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pad", ["right", "left", "both"])
@pytest.mark.parametrize("causal,window,nq", [(False, (-1, -1), 150), (True, (-1, -1), 150), (True, (-1, -1), 1),
                                              (False, (20, 5), 150)], ids=["full", "causal", "decode", "window"])
def test_seqused_k(backend, dtype, pad, causal, window, nq):
    if backend not in SEQ_BACKENDS[dtype]:
        pytest.skip(f"{backend} does not run {dtype} here")
    B, Hq, Hkv, Nk, D = 4, 4, 2, 150, 40
    lens = torch.tensor([150, 37, 1, 0], dtype=torch.int32)
    kw, start = {}, torch.zeros(B, dtype=torch.int32)
    if pad in ("right", "both"):
        kw["seqused_k"] = lens
    if pad in ("left", "both"):
        start = (Nk - lens) if pad == "left" else torch.tensor([0, 60, 149, 3], dtype=torch.int32)
        kw["seqstart_k"] = start
    end = start + lens if "seqused_k" in kw else torch.full((B,), Nk, dtype=torch.int32)
    q = T.randn(B, Hq, nq, D, dtype=dtype)
    k = T.randn(B, Hkv, Nk, D, dtype=dtype, seed=1)
    v = T.randn(B, Hkv, Nk, D, dtype=dtype, seed=2)
    (qk, kk, vk), (qb, kb, vb) = [[t.detach().clone().requires_grad_(True) for t in (q, k, v)] for _ in range(2)]
    qr, kr, vr = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    out, lse = fk.flash_attention(qk, kk, vk, causal=causal, window_size=window, return_lse=True, backend=backend,
                                  **kw)
    # the oracle: a dense boolean (B, 1, Nq, Nk) mask
    mask = _padded_mask(B, nq, Nk, start, end, causal, window)
    s = (qr @ kr.repeat_interleave(2, 1).transpose(-1, -2)) / D**0.5
    s = s.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    ref = torch.softmax(s.masked_fill(empty, 0), -1).masked_fill(empty, 0) @ vr.repeat_interleave(2, 1)
    base = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True).nan_to_num(0.0)
    T.assert_close_to_reference(out, ref, base, name=f"{backend} out")
    assert torch.equal(torch.isinf(lse), empty[..., 0].expand(B, Hq, nq))
    g = T.randn(B, Hq, nq, D, seed=3)
    out.backward(g.to(dtype))
    ref.backward(g)
    base.backward(g.to(dtype))
    for name, a, r, b in (("dq", qk, qr, qb), ("dk", kk, kr, kb), ("dv", vk, vr, vb)):
        T.assert_close_to_reference(a.grad, r.grad, b.grad.nan_to_num(0.0), name=f"{backend} {name}", dtype=dtype)


def test_seqused_k_bad_input():
    q = T.randn(2, 2, 8, 16)
    lens = torch.tensor([8, 3], dtype=torch.int32)
    with pytest.raises(TypeError, match="seqused_k must have dtype int32"):
        fk.flash_attention(q, q, q, seqused_k=lens.long())
    with pytest.raises(ValueError, match=r"seqused_k must have shape \(B,\) = \(2,\)"):
        fk.flash_attention(q, q, q, seqused_k=lens[:1])
    with pytest.raises(ValueError, match="seqused_k must be <= the keys N = k.shape\\[2\\] = 8, got 9"):
        fk.flash_attention(q, q, q, seqused_k=torch.tensor([9, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqstart_k \\+ seqused_k must be <= the keys"):
        fk.flash_attention(q, q, q, seqused_k=lens, seqstart_k=torch.tensor([1, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqused_k must be >= 0"):
        fk.flash_attention(q, q, q, seqused_k=torch.tensor([-1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqstart_k must be >= 0"):
        fk.flash_attention(q, q, q, seqstart_k=torch.tensor([-1, 3], dtype=torch.int32))


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
def test_seqused_k_opcheck_and_compile():
    q = T.randn(2, 4, 9, 40).requires_grad_(True)
    k = T.randn(2, 2, 13, 40, seed=1).requires_grad_(True)
    v = T.randn(2, 2, 13, 40, seed=2).requires_grad_(True)
    ks, ke = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([7, 13], dtype=torch.int32)
    fwd = torch.ops.fmkernels.flash_attention_range_fwd.default
    torch.library.opcheck(fwd, (q, k, v, ks, ke, 0.2, -1, 0))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), ks, ke, 0.2, -1, 0)
    torch.library.opcheck(
        torch.ops.fmkernels.flash_attention_range_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, ks, ke, 0.2, -1, 0),
    )
    with pytest.raises(RuntimeError, match="key_start <= key_end"):
        fwd(q, k, v, ke, ks, 0.2, -1, 0)

    def f(a, b, c, used):
        return fk.flash_attention(a, b, c, causal=True, seqused_k=used).sum()

    used = torch.tensor([13, 5], dtype=torch.int32)
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(g(q, k, v, used), f(q, k, v, used))


# ------------------------------------------------------------------ nn


def test_nn_attention_packed_equals_documents_alone():
    torch.manual_seed(0)
    att = fk.nn.Attention(64, 4, 2).eval()
    docs = [7, 1, 20]
    x = torch.randn(1, sum(docs), 64)
    cu = _cu(docs)
    with torch.no_grad():
        out = att(x, cu_seqlens=cu)
        alone = torch.cat([att(x[:, s:s + n]) for s, n in zip(cu[:-1].tolist(), docs)], 1)
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_nn_sdpa_seqused_k(causal):
    q, k, v = (T.randn(2, 4, 12, 16, seed=s) for s in range(3))
    used, start = torch.tensor([12, 5], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
    out = fk.nn.scaled_dot_product_attention(q, k, v, is_causal=causal, seqused_k=used, seqstart_k=start)
    j = torch.arange(12)
    mask = ((j >= start[:, None]) & (j < (start + used)[:, None]))[:, None, None, :]
    if causal:
        mask = mask & torch.ones(12, 12, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a case the kernel does not take (dropout) falls back to SDPA with the equivalent mask
    with torch.no_grad():
        fb = fk.nn.scaled_dot_product_attention(q, k, v, is_causal=causal, seqused_k=used, seqstart_k=start,
                                                dropout_p=1e-9)
    rows = mask.any(-1, keepdim=True).expand_as(out)
    torch.testing.assert_close(fb[rows], ref[rows], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("triton" not in BACKENDS[torch.float32], reason="triton not importable")
def test_triton_opcheck():
    from fmkernels.ops.attention_varlen import triton_module

    triton_module()  # registers the op, with the backward of fmkernels/ops/attention_varlen.py

    lens_q, lens_k = [3, 0, 5], [4, 2, 7]
    q = T.randn(sum(lens_q), 2, 16).requires_grad_(True)
    k = T.randn(sum(lens_k), 1, 16, seed=1).requires_grad_(True)
    v = T.randn(sum(lens_k), 1, 16, seed=2).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.fmkernels.flash_attention_varlen_fwd_triton.default, (q, k, v, _cu(lens_q), _cu(lens_k), 5, 7, 0.25,
                                                                        -1, 0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
