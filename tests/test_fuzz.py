"""Fuzz every op against fp64 (issue 21), with hypothesis, seeded and bounded in time.

Rule (fmkernels.testing): the error of the op vs an fp64 computation on the same (low-precision) inputs is at most
2x plain PyTorch's error in the same precision, plus a rounding floor; integer results are exact; int4 (whose CPU
kernel quantizes activations into two int8 terms) meets the SQNR floor of tests/test_quant.py against the reference.
Shapes are odd (1..~300, any head dim / block the op takes), scales span 1e-3..1e3, inputs are sometimes
non-contiguous. Attention: fwd and bwd vs fp64 with SDPA as the same-precision baseline.

Profiles (FMK_FUZZ): unset, `make test`: about 4 s per op (~1 minute in all); FMK_FUZZ=long, `make fuzz`: 240 s per op
(FMK_FUZZ_SECONDS overrides). Seeded by FMK_FUZZ_SEED (default 21): a failure prints its example and reruns with the
same seed.
"""
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fmkernels as fk  # noqa: E402
from fmkernels import testing as T  # noqa: E402
from fmkernels.ops import quant as q  # noqa: E402
from fmkernels.ops import sparse as sp  # noqa: E402
from fmkernels.reference import quant as rq  # noqa: E402
from fmkernels.reference import rope as rrope  # noqa: E402
from fmkernels.reference.attention import attention_mask  # noqa: E402

LONG = os.environ.get("FMK_FUZZ", "") == "long"
BUDGET_S = float(os.environ.get("FMK_FUZZ_SECONDS", 240 if LONG else 4))
SEED = int(os.environ.get("FMK_FUZZ_SEED", 21))
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


class _TimeUp(Exception):
    pass


def fuzz(strategy):
    """Run the decorated check on examples from `strategy` until BUDGET_S seconds have passed."""

    def deco(check):
        def test(*args, **kwargs):
            deadline = time.monotonic() + BUDGET_S
            runs = []

            @seed(SEED)
            @settings(max_examples=10**9 if LONG else 100_000, deadline=None, database=None,
                      phases=[Phase.generate] if LONG else [Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck), derandomize=False, print_blob=True)
            @given(strategy)
            def run(case):
                if time.monotonic() > deadline:
                    raise _TimeUp
                torch.manual_seed(len(runs))
                check(case, *args, **kwargs)
                runs.append(1)

            try:
                run()
            except _TimeUp:
                pass
            assert runs, "no example ran within the budget"
            print(f"{check.__name__}: {len(runs)} examples in {BUDGET_S:.0f} s (seed {SEED})")  # shown with -s / -rP

        test.__name__ = check.__name__
        return test

    return deco


def _x(shape, dtype, scale, noncontig=False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)
    return T.non_contiguous(t) if noncontig and t.dim() >= 2 else t


SCALE = st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3])


def _check(out, ref64, baseline, name, dtype):
    T.assert_close_to_reference(out.float(), ref64, baseline.float(), name=name, dtype=dtype)


# ---------------------------------------------------------------- float ops


@fuzz(st.tuples(st.integers(1, 300), st.integers(1, 300), DTYPES, SCALE, st.booleans()))
def test_fuzz_rms_norm(case):
    rows, H, dtype, scale, nc = case
    x = _x((rows, H), dtype, scale, nc).requires_grad_()
    w = (1 + 0.1 * torch.randn(H, dtype=torch.float64)).to(dtype).requires_grad_()
    dy = torch.randn(rows, H).to(dtype)
    eps = 1e-6
    y = fk.rms_norm(x, w, eps)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.rms_norm(x64, (H,), w64, eps)
    rx, rw = torch.autograd.grad(y64, (x64, w64), dy.double())
    xb, wb = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yb = F.rms_norm(xb, (H,), wb, eps)
    bx, bw = torch.autograd.grad(yb, (xb, wb), dy)
    _check(y, y64, yb, f"rms_norm {case}", dtype)
    T.all_close_grads([gx, gw], [rx, rw], [bx, bw], [f"dx {case}", f"dw {case}"])  # floors of the grads' dtype


@fuzz(st.tuples(st.integers(1, 200), st.integers(1, 300), DTYPES, SCALE))
def test_fuzz_swiglu(case):
    rows, Fd, dtype, scale = case
    a, b = _x((rows, Fd), dtype, scale).requires_grad_(), _x((rows, Fd), dtype, 1.0).requires_grad_()
    dy = torch.randn(rows, Fd).to(dtype)
    y = fk.swiglu(a, b)
    ga, gb = torch.autograd.grad(y, (a, b), dy)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = F.silu(a64) * b64
    ra, rb = torch.autograd.grad(y64, (a64, b64), dy.double())
    ab, bb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    yb = F.silu(ab) * bb
    ba, bbg = torch.autograd.grad(yb, (ab, bb), dy)
    _check(y, y64, yb, f"swiglu {case}", dtype)
    T.all_close_grads([ga, gb], [ra, rb], [ba, bbg], [f"da {case}", f"db {case}"])


@fuzz(st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 4), st.integers(1, 64), DTYPES, SCALE))
def test_fuzz_rope(case):
    B, N, H, half, dtype, scale = case
    D = 2 * half
    qx, kx = _x((B, N, H, D), dtype, scale), _x((B, N, 1, D), dtype, scale)
    cos, sin = rrope.rope_cos_sin(N, D)
    yq, yk = fk.rope(qx, kx, cos, sin)

    def rot64(x):
        x = x.double()
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def rot_low(x):  # plain PyTorch in the input precision
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos.to(x.dtype)[None, :, None, :], sin.to(x.dtype)[None, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    _check(yq, rot64(qx), rot_low(qx), f"rope q {case}", dtype)
    _check(yk, rot64(kx), rot_low(kx), f"rope k {case}", dtype)


@fuzz(st.tuples(st.integers(1, 80), st.integers(1, 96), st.integers(2, 300), DTYPES, SCALE, st.booleans(),
                st.sampled_from(["mean", "sum"])))
def test_fuzz_linear_cross_entropy(case):
    Tn, H, V, dtype, scale, bias, red = case
    x = _x((Tn, H), dtype, scale / math.sqrt(H)).requires_grad_()
    w = _x((V, H), dtype, 1.0).requires_grad_()
    b = _x((V,), dtype, 1.0).requires_grad_() if bias else None
    t = torch.randint(0, V, (Tn,))
    t[torch.rand(Tn) < 0.1] = -100
    if red == "mean" and not (t != -100).any():
        t[0] = 0
    params = [p for p in (x, w, b) if p is not None]
    loss = fk.linear_cross_entropy(x, w, t, b, reduction=red)
    grads = torch.autograd.grad(loss, params)
    p64 = [p.detach().double().requires_grad_() for p in params]
    l64 = F.cross_entropy(F.linear(p64[0], p64[1], p64[2] if bias else None), t, reduction=red)
    r64 = torch.autograd.grad(l64, p64)
    pb = [p.detach().clone().requires_grad_() for p in params]
    lb = F.cross_entropy(F.linear(pb[0], pb[1], pb[2] if bias else None).float(), t, reduction=red)
    rb = torch.autograd.grad(lb, pb)
    _check(loss, l64, lb, f"loss {case}", dtype)
    T.all_close_grads(list(grads), list(r64), list(rb),
                      [f"grad {n} {case}" for n in ("x", "w", "b")[: len(params)]])


@fuzz(st.tuples(st.integers(1, 100), st.integers(1, 200), st.integers(1, 200), DTYPES, SCALE, st.booleans()))
def test_fuzz_linear(case):
    M, N, K, dtype, scale, nc = case
    x, w, b = _x((M, K), dtype, scale, nc), _x((N, K), dtype, 1 / math.sqrt(K)), _x((N,), dtype, 1.0)
    _check(fk.linear(x, w, b), F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b), f"linear {case}", dtype)


@fuzz(st.tuples(st.integers(1, 100), st.integers(1, 100), st.integers(1, 64), DTYPES, SCALE))
def test_fuzz_sparse24_mm(case):
    M, N, K4, dtype, scale = case
    K = 4 * K4
    x = _x((M, K), dtype, scale)
    values, meta = sp.compress_24(_x((N, K), dtype, 1 / math.sqrt(K)), prune=True)
    wd = sp.decompress_24(values, meta)
    b = _x((N,), dtype, 1.0)
    _check(sp.sparse24_mm(x, values, meta, b), F.linear(x.double(), wd.double(), b.double()), F.linear(x, wd, b),
           f"sparse24_mm {case}", dtype)


@fuzz(st.tuples(st.integers(1, 100), st.integers(1, 6), st.integers(1, 6), st.sampled_from([16, 32, 64]), DTYPES,
                SCALE, st.floats(0.0, 1.0)))
def test_fuzz_bsr_mm(case):
    M, nb, kb, bs, dtype, scale, density = case
    N, K = nb * bs, kb * bs
    x = _x((M, K), dtype, scale)
    mask = torch.rand(nb, kb) < density
    blocks, rp, ci = sp.compress_bsr(_x((N, K), dtype, 1 / math.sqrt(K)), bs, block_mask=mask)
    wd = sp.decompress_bsr(blocks, rp, ci, K)
    _check(sp.bsr_mm(x, blocks, rp, ci), x.double() @ wd.double().t(), x @ wd.t(), f"bsr_mm {case}", dtype)


# ---------------------------------------------------------------- quantized ops


@fuzz(st.tuples(st.integers(1, 64), st.integers(1, 100), st.integers(1, 700)))
def test_fuzz_int8_mm_exact(case):
    M, N, K = case
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    bq = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    packed, comp = q.int8_pack_weight(bq)
    out = q.int8_mm(a, torch.ones(M), packed, comp, torch.ones(N), out_dtype=torch.int32)
    T.assert_exact(out, (a.long() @ bq.long().t()).int(), name=f"int8_mm {case}")


@fuzz(st.tuples(st.integers(1, 64), st.integers(1, 300), st.sampled_from([torch.float32, torch.bfloat16,
                                                                          torch.float16]), SCALE))
def test_fuzz_quantize_per_row_matches_reference(case):
    M, K, dtype, scale = case
    x = _x((M, K), dtype, scale)
    qq, s = q.quantize_per_row(x)
    rq_, rs = rq.quantize_per_row(x)
    T.assert_exact(qq, rq_, name=f"codes {case}")
    T.assert_exact(s, rs, name=f"scales {case}")


@fuzz(st.tuples(st.integers(1, 64), st.integers(1, 100), st.integers(1, 400), DTYPES, SCALE))
def test_fuzz_int8_linear(case):
    """The quantized product vs its fp64 value (same codes), 2x the reference backend's fp32 error."""
    M, N, K, dtype, scale = case
    x = _x((M, K), dtype, scale)
    packed, comp, s = q.int8_quantize_weight(_x((N, K), torch.float32, 1.0))
    bias = _x((N,), torch.float32, 1.0)
    out = q.int8_linear(x, packed, comp, s, bias)
    qa, sa = rq.quantize_per_row(x)
    wq = rq.int8_unpack_weight(packed, N, K)
    ref64 = (qa.double() @ wq.double().t()) * sa.double()[:, None] * s.double()[None] + bias.double()
    _check(out, ref64, rq.int8_linear(x, packed, comp, s, bias), f"int8_linear {case}", dtype)


@fuzz(st.tuples(st.integers(1, 64), st.integers(1, 80), st.integers(1, 4), st.sampled_from([32, 64, 128]), DTYPES,
                SCALE, st.sampled_from([1, 2])))
def test_fuzz_int4_mm(case):
    """The CPU kernel quantizes each activation row on the fly (act_terms=1: int8 codes, step s = amax/127;
    act_terms=2: plus an int8 residual, step s/254), so |y - y_ref| <= step/2 * sum_k |W[n, k]| per output, with
    y_ref the reference (dequantized weight, unquantized x), plus fp32 rounding (a bound, not a statistic: an SQNR
    floor fails on a single cancelling dot product)."""
    M, N, kg, G, dtype, scale, terms = case
    K = kg * G
    x = _x((M, K), dtype, scale)
    p, s, z = q.int4_quantize_weight(_x((N, K), torch.float32, 1.0), G)
    y = q.int4_mm(x, p, s, z, G, N, act_terms=terms).double()
    ref = rq.int4_mm(x.float(), p, s, z, G, N).double()
    wt = rq.int4_mm(torch.eye(K), p, s, z, G, N).double()  # (K, N): the dequantized W^T
    step = x.double().abs().amax(1, keepdim=True) / 127 / (254 if terms == 2 else 1)  # (M, 1)
    bound = step / 2 * wt.abs().sum(0)[None] * 1.01  # (M, N)
    mag = (x.double().abs() @ wt.abs()).clamp_min(1e-30)  # rounding floor of fp32 / the output dtype
    bound = bound + mag * (2e-6 if dtype == torch.float32 else 8e-3)
    err = (y - ref).abs()
    assert (err <= bound).all(), f"int4_mm {case}: error {err.max().item():.3e} over the bound at {(err > bound).nonzero()[0].tolist()}"


# ---------------------------------------------------------------- attention


def _attention64(q, k, v, mask, scale):
    """fp64 attention (the oracle): rows that see no key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ v


WINDOW = st.one_of(st.just((-1, -1)), st.tuples(st.integers(-1, 20), st.integers(-1, 20)))


# fp32 (issue 21's rule is for fp32 attention). The bf16 kernels round P and dS to bf16 for their GEMMs (as
# FlashAttention-2 does) where SDPA's CPU bf16 backward keeps them in fp32: dk up to ~8x SDPA's error vs fp64 on
# near-one-hot rows (e.g. q scale 10, 3 keys, window (1, 1)); FMK_FUZZ_ATTN=bf16 adds bf16.
ATTN_DTYPE = DTYPES if os.environ.get("FMK_FUZZ_ATTN", "") == "bf16" else st.sampled_from([torch.float32])
# q scales up to 1 (scores ~N(0, 1), with single-key rows from the windows). FMK_FUZZ_ATTN_SCALE=10 or =1e3 adds
# larger scores, where the 2x rule stops measuring the kernel: SDPA against itself with the head dim permuted (the
# same math, another fp32 summation order) breaks it in 8 / 400 cases at 10 and 75 / 400 at 1e3, fmkernels in 0 and
# 8-13 / 400 (scripts/attention_2x_rule_rates.py; 38 at 1e3 before the backward's row-mass correction for
# |lse| >= 64, see csrc/cpu/flash_attention_bwd.cpp).
_EXTRA_SCALE = {"10": [10.0], "1e3": [10.0, 1e3]}.get(os.environ.get("FMK_FUZZ_ATTN_SCALE", ""), [])
ATTN_SCALE = st.sampled_from([1e-3, 0.1, 1.0] + _EXTRA_SCALE)


@fuzz(st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 150), st.integers(1, 150),
                st.integers(1, 128), ATTN_DTYPE, ATTN_SCALE, st.booleans(), WINDOW))
def test_fuzz_flash_attention(case):
    """fmkernels.flash_attention (default dispatch) fwd and bwd vs fp64, 2x SDPA's error in the same precision.
    Windows of width 0 and causal rows at the top see a single key (whose dv broke the rule by 31.8x before the fp32
    kernels kept the softmax in natural-log units and delta in dP's summation order)."""
    B, Hkv, grp, Nq, Nk, D, dtype, scale, causal, window = case
    Hq = Hkv * grp
    q = _x((B, Hq, Nq, D), dtype, scale).requires_grad_()
    k, v = _x((B, Hkv, Nk, D), dtype, 1.0).requires_grad_(), _x((B, Hkv, Nk, D), dtype, 1.0).requires_grad_()
    do = torch.randn(B, Hq, Nq, D).to(dtype)
    left, right = window
    mask = attention_mask(Nq, Nk, left, 0 if causal else right)
    sm = 1.0 / math.sqrt(D)
    out = fk.flash_attention(q, k, v, causal=causal, window_size=window)
    grads = torch.autograd.grad(out, (q, k, v), do)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = _attention64(*l64, mask, sm)
    r64 = torch.autograd.grad(o64, l64, do.double())
    lb = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ob = F.scaled_dot_product_attention(*lb, attn_mask=mask, scale=sm, enable_gqa=grp > 1)
    rb = torch.autograd.grad(ob, lb, do)
    ob, rb = ob.nan_to_num(0.0), [g.nan_to_num(0.0) for g in rb]  # SDPA: NaN on rows that see no key; ours: 0
    _check(out, o64, ob, f"attention out {case}", dtype)
    T.all_close_grads(list(grads), list(r64), list(rb), [f"attention d{n} {case}" for n in "qkv"])
