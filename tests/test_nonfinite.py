"""NaN / Inf semantics (issue 21): every op, every CPU backend, fp32 and bf16, against its PyTorch peer under the one
rule in fmkernels.testing.NONFINITE_RULE (attention: SDPA's semantics, fmkernels.testing.attention_nonfinite_peer)."""
import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from fmkernels.ops import quant as q
from fmkernels.ops import sparse as sp
from fmkernels import testing as T
from fmkernels.reference.attention import attention_mask
from fmkernels.testing import assert_nonfinite_like, available_backends

NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": -float("inf")}


def _poison(t: torch.Tensor, value: float, seed: int, n: int = 3) -> torch.Tensor:
    """t with `value` at n seeded positions (a copy)."""
    g = torch.Generator().manual_seed(seed)
    t = t.clone()
    flat = t.view(-1)
    flat[torch.randint(0, flat.numel(), (n,), generator=g)] = value
    return t


def _rn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _backends(op_name, dtype):
    return [b for b in available_backends(op_name, "cpu", dtype) if b in ("cpu", "reference")]


# Each op: (dispatch name, build(dtype) -> inputs dict, which inputs get poisoned, run(inputs, backend) -> output,
# peer(inputs) -> output computed by PyTorch in fp32)
def _lin_inputs(dtype):
    return dict(x=_rn(6, 64, dtype=dtype), w=_rn(24, 64, dtype=dtype, seed=1), b=_rn(24, dtype=dtype, seed=2))


def _peer_linear(i):
    return F.linear(i["x"].float(), i["w"].float(), i["b"].float())


def _peer_24(i):
    """torch.sparse semantics: only the stored (kept) weights are multiplied; a pruned weight is absent, not a zero
    (NaN * 0 would be NaN), as torch.sparse.mm and cuSPARSELt compute it."""
    values, meta = sp.compress_24(i["w"], prune=True)
    cols = sp.ref.sparse24_columns(meta, i["w"].shape[1])  # (N, K/2)
    x = i["x"].float()
    return (x[:, cols] * values.float()[None]).sum(-1) + i["b"].float()  # (M, N)


OPS = {
    "linear": ("linear", _lin_inputs, ("x", "w", "b"), lambda i, be: fk.linear(i["x"], i["w"], i["b"], backend=be),
               _peer_linear),
    "rms_norm": ("rms_norm", lambda dt: dict(x=_rn(6, 64, dtype=dt), w=_rn(64, dtype=dt, seed=1)), ("x", "w"),
                 lambda i, be: fk.rms_norm(i["x"], i["w"], 1e-6, backend=be),
                 lambda i: F.rms_norm(i["x"].float(), (64,), i["w"].float(), 1e-6)),
    "swiglu": ("swiglu", lambda dt: dict(a=_rn(6, 64, dtype=dt), b=_rn(6, 64, dtype=dt, seed=1)), ("a", "b"),
               lambda i, be: fk.swiglu(i["a"], i["b"], backend=be),
               lambda i: F.silu(i["a"].float()) * i["b"].float()),
    "rope": ("rope", lambda dt: dict(q=_rn(2, 8, 4, 32, dtype=dt), k=_rn(2, 8, 2, 32, dtype=dt, seed=1),
                                     cos=_rn(8, 16, seed=2).cos(), sin=_rn(8, 16, seed=2).sin()), ("q", "k"),
             lambda i, be: torch.cat([t.flatten() for t in fk.rope(i["q"], i["k"], i["cos"], i["sin"], backend=be)]),
             lambda i: torch.cat([t.flatten() for t in
                                  fk.rope(i["q"].float(), i["k"].float(), i["cos"], i["sin"], backend="reference")])),
    "linear_cross_entropy": (
        "linear_cross_entropy",
        lambda dt: dict(x=_rn(12, 32, dtype=dt), w=_rn(50, 32, dtype=dt, seed=1), b=_rn(50, dtype=dt, seed=2),
                        t=torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(3))), ("x", "w", "b"),
        lambda i, be: torch.stack([fk.linear_cross_entropy(i["x"], i["w"], i["t"], i["b"], reduction=r, backend=be)
                                   for r in ("mean", "sum")]),
        lambda i: torch.stack([F.cross_entropy(F.linear(i["x"].float(), i["w"].float(), i["b"].float()), i["t"],
                                               reduction=r) for r in ("mean", "sum")])),
    "int8_linear": ("int8_linear", _lin_inputs, ("x", "w"),
                    lambda i, be: q.int8_linear(i["x"], *q.int8_quantize_weight(i["w"]), i["b"], backend=be),
                    _peer_linear),
    "int4_mm": ("int4_mm", _lin_inputs, ("x", "w"),
                lambda i, be: q.int4_mm(i["x"], *q.int4_quantize_weight(i["w"], 32), 32, 24, i["b"], backend=be),
                _peer_linear),
    "sparse24_mm": ("sparse24_mm", _lin_inputs, ("x", "w", "b"),
                    lambda i, be: sp.sparse24_mm(i["x"], *sp.compress_24(i["w"], prune=True), i["b"], backend=be),
                    _peer_24),
    "bsr_mm": ("bsr_mm", _lin_inputs, ("x", "b"),
               lambda i, be: sp.bsr_mm(i["x"], *sp.compress_bsr(torch.cat([i["w"], i["w"][:8]]), 16),
                                       torch.cat([i["b"], i["b"][:8]]), backend=be),
               lambda i: F.linear(i["x"].float(), torch.cat([i["w"], i["w"][:8]]).float(),
                                  torch.cat([i["b"], i["b"][:8]]).float())),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(NONFINITE))
@pytest.mark.parametrize("op", sorted(OPS))
def test_nonfinite_reaches_the_output_like_pytorch(op, kind, dtype):
    name, build, poisonable, run, peer = OPS[op]
    backends = _backends(name, dtype)
    if not backends:
        pytest.skip(f"{op}: no CPU backend for {dtype}")
    for j, arg in enumerate(poisonable):
        inputs = build(dtype)
        inputs[arg] = _poison(inputs[arg], NONFINITE[kind], seed=17 * j + 1)
        want = peer(inputs)
        assert not torch.isfinite(want).all()  # the case does reach the output
        for be in backends:
            assert_nonfinite_like(run(inputs, be), want, name=f"{op}[{be}] {kind} in {arg} {dtype}")
        finite = build(dtype)
        for be in backends:  # and nothing non-finite from finite data
            assert_nonfinite_like(run(finite, be), peer(finite), name=f"{op}[{be}] finite {dtype}")


def test_loss_nan_in_a_non_target_weight_row():
    """The issue's case: a NaN in a weight row no token targets still reaches the loss (and a model with a NaN
    embedding row reports a NaN training loss)."""
    torch.manual_seed(0)
    x, w = torch.randn(8, 16), torch.randn(50, 16)
    t = torch.randint(0, 49, (8,))
    w[49, 3] = float("nan")
    for be in _backends("linear_cross_entropy", torch.float32):
        assert torch.isnan(fk.linear_cross_entropy(x, w, t, backend=be))
        assert torch.isnan(fk.linear_cross_entropy(x.bfloat16(), w.bfloat16(), t, backend=be))


def test_loss_over_zero_counted_tokens_is_nan_like_pytorch():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(10, 16, requires_grad=True)
    t = torch.full((4,), -100)
    peer = F.cross_entropy(x @ w.t(), t)
    assert torch.isnan(peer)
    for be in _backends("linear_cross_entropy", torch.float32):
        loss = fk.linear_cross_entropy(x, w, t, backend=be)
        assert torch.isnan(loss), be
        assert fk.linear_cross_entropy(x, w, t, reduction="sum", backend=be).item() == 0.0
        gx, gw = torch.autograd.grad(loss, (x, w))
        assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))  # as F.cross_entropy


def test_loss_on_meta_tensors_gives_shapes_like_pytorch():
    x = torch.empty(8, 16, device="meta", requires_grad=True)
    loss = fk.linear_cross_entropy(x, torch.empty(50, 16, device="meta"), torch.empty(8, dtype=torch.long, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert x.grad.shape == (8, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_quantize_per_row_nonfinite_rows(dtype):
    """NaN or +-Inf in a row: scale NaN and codes 0 on every backend (bit-identical), finite rows untouched."""
    x = _rn(6, 100, dtype=dtype)
    x[1, 5], x[2, 99], x[3, 0], x[4, 50] = float("nan"), float("inf"), -float("inf"), float("nan")
    x[4, 51] = float("inf")
    outs = {be: q.quantize_per_row(x, backend=be) for be in _backends("quantize_per_row", dtype)}
    ref_q, ref_s = outs["reference"]
    assert torch.isnan(ref_s[1:5]).all() and torch.isfinite(ref_s[[0, 5]]).all()
    assert (ref_q[1:5] == 0).all()
    for be, (qq, s) in outs.items():
        assert torch.equal(qq, ref_q), be
        assert torch.equal(torch.isnan(s), torch.isnan(ref_s)) and torch.equal(s[[0, 5]], ref_s[[0, 5]]), be


@pytest.mark.parametrize("where", ["q", "k"])
def test_attention_nan_reaches_the_output_like_sdpa(where):
    q_, k_, v_ = (_rn(1, 2, 16, 32, seed=s) for s in range(3))
    inputs = dict(q=q_, k=k_, v=v_)
    inputs[where] = _poison(inputs[where], float("nan"), seed=5, n=1)
    want = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
    got = fk.flash_attention(inputs["q"], inputs["k"], inputs["v"], backend="cpu")
    assert_nonfinite_like(got, want, name=f"flash_attention nan in {where}")


def _attention_backends(dtype):
    """(backend, FMK_CPU_ISA) pairs: the compiled CPU kernels at their best ISA and portable, the reference, and
    Triton when it runs here (TRITON_INTERPRET=1; its interpreter mangles bf16 NaN / Inf, so fp32 only there)."""
    names = available_backends("flash_attention", "cpu", dtype)
    out = [(b, None) for b in names if b in ("cpu", "reference") or (b == "triton" and dtype == torch.float32)]
    if "cpu" in names:
        out.append(("cpu", "portable"))
    return out


ATTN_MASKS = {"none": (False, (-1, -1)), "causal": (True, (-1, -1)), "window": (False, (5, 3))}


def _attn_case(Nq, Nk, where, kind, dtype, Hq=4, Hkv=2, D=40):
    d = dict(q=_rn(2, Hq, Nq, D, seed=1), k=_rn(2, Hkv, Nk, D, seed=2), v=_rn(2, Hkv, Nk, D, seed=3))
    if kind == "overflow":  # every product of one row overflows to +inf: a +inf score in any summation order (with
        # mixed signs an FMA chain ends at +inf or -inf depending on the order, so SDPA itself is order-dependent)
        r = Nq // 2 if where == "q" else Nk // 3
        d[where][1, 0, r] = d[where][1, 0, r].abs() * 1e25
        other = "k" if where == "q" else "q"
        d[other] = d[other].abs() * 1e15
    else:
        d[where][1, 1, Nq // 2 if where == "q" else Nk // 3, 7] = NONFINITE[kind]
        d[where][0, 0, 0, 1] = NONFINITE[kind]
    return {a: t.to(dtype) for a, t in d.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", sorted(ATTN_MASKS))
@pytest.mark.parametrize("Nq", [3, 70], ids=["decode", "tiled"])
def test_attention_nonfinite_like_sdpa(Nq, mask, dtype, monkeypatch):
    """NONFINITE_RULE for flash_attention on every backend and ISA: NaN / +-Inf in q, k, v and overflowing scores,
    unmasked, causal and windowed, the decoding (Nq <= 16) and tiled paths, GQA."""
    Nk = 70
    causal, window = ATTN_MASKS[mask]
    allowed = attention_mask(Nq, Nk, window[0], 0 if causal else window[1])
    for be, isa in _attention_backends(dtype):
        if isa:
            monkeypatch.setenv("FMK_CPU_ISA", isa)
        else:
            monkeypatch.delenv("FMK_CPU_ISA", raising=False)
        for where in "qkv":
            for kind in [*sorted(NONFINITE), "overflow"]:
                if kind == "overflow" and where == "v":
                    continue
                i = _attn_case(Nq, Nk, where, kind, dtype)
                peer, may = T.attention_nonfinite_peer(i["q"], i["k"], i["v"], allowed)
                got = fk.flash_attention(i["q"], i["k"], i["v"], causal=causal, window_size=window, backend=be)
                assert_nonfinite_like(got, peer, may=may, name=f"{be}/{isa} {kind} in {where} {dtype} Nq={Nq} {mask}")
        i = _attn_case(Nq, Nk, "q", "nan", dtype)
        i["q"] = _rn(*i["q"].shape).to(dtype)
        got = fk.flash_attention(i["q"], i["k"], i["v"], causal=causal, window_size=window, backend=be)
        assert_nonfinite_like(got, T.attention_nonfinite_peer(i["q"], i["k"], i["v"], allowed)[0],
                              name=f"{be}/{isa} finite {dtype} Nq={Nq} {mask}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_varlen_nonfinite_like_sdpa(dtype, monkeypatch):
    """flash_attention_varlen: a non-finite value reaches its own sequence's rows and no other sequence's."""
    from fmkernels.ops.attention_varlen import flash_attention_varlen

    lens = [37, 70, 5]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    names = available_backends("flash_attention_varlen", "cpu", dtype)
    for be, isa in [(b, i) for b, i in _attention_backends(dtype) if b in names]:
        if isa:
            monkeypatch.setenv("FMK_CPU_ISA", isa)
        else:
            monkeypatch.delenv("FMK_CPU_ISA", raising=False)
        for where in "qkv":
            for kind in sorted(NONFINITE):
                x = {a: _rn(sum(lens), 4 if a == "q" else 2, 32, seed=s) for s, a in enumerate("qkv")}
                x[where][40, 1, 3] = NONFINITE[kind]  # sequence 1, row 3
                x = {a: t.to(dtype) for a, t in x.items()}
                got = flash_attention_varlen(x["q"], x["k"], x["v"], cu, cu, max(lens), max(lens), causal=True,
                                             backend=be)
                for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                    seq = [x[n][a:b].transpose(0, 1)[None] for n in "qkv"]
                    peer, may = T.attention_nonfinite_peer(*seq, attention_mask(b - a, b - a, -1, 0))
                    assert_nonfinite_like(got[a:b].transpose(0, 1)[None], peer, may=may,
                                          name=f"varlen {be}/{isa} {kind} in {where} {dtype} sequence {s}")
