"""Issue 21's bad-input reproductions: every one gets a clear Python error naming the argument (never a crash,
never uninitialized memory, never a silently wrong answer)."""
import os
import subprocess
import sys

import pytest
import torch

import fmkernels as fk
from fmkernels.nn.quantized import Int4Linear, Int8Linear
from fmkernels.ops import quant as q
from fmkernels.ops import sparse as sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- BSR indices


def _bsr():
    torch.manual_seed(0)
    return sp.compress_bsr(torch.randn(64, 64), 16)


BAD_BSR = {
    "interior row_ptr huge": (lambda rp, ci: rp.__setitem__(1, 10**6), "row_ptr must be non-decreasing"),
    "interior row_ptr negative": (lambda rp, ci: rp.__setitem__(2, -3), "row_ptr must be non-decreasing"),
    "non-monotonic row_ptr": (lambda rp, ci: (rp.__setitem__(1, 6), rp.__setitem__(2, 5)), "non-decreasing"),
    "first entry": (lambda rp, ci: rp.__setitem__(0, 1), "row_ptr must start at 0"),
    "last entry": (lambda rp, ci: rp.__setitem__(-1, 3), "end at nnzb"),
    "col_idx out of range": (lambda rp, ci: ci.__setitem__(0, 4), r"col_idx entries must be in \[0, K/b\)"),
    "col_idx negative": (lambda rp, ci: ci.__setitem__(5, -1), r"col_idx entries must be in"),
    "duplicate block": (lambda rp, ci: ci.__setitem__(1, int(ci[0])), "strictly ascending"),
}


@pytest.mark.parametrize("case", sorted(BAD_BSR))
@pytest.mark.parametrize("where", ["bsr_mm", "bsr_mm_backward", "decompress_bsr", "state_dict"])
def test_bsr_indices_are_validated(case, where):
    mutate, msg = BAD_BSR[case]
    blocks, rp, ci = _bsr()
    mutate(rp, ci)
    x = torch.randn(4, 64, requires_grad=True)
    with pytest.raises((ValueError, RuntimeError), match=msg):
        if where == "bsr_mm":
            sp.bsr_mm(x, blocks, rp, ci)
        elif where == "bsr_mm_backward":
            sp.bsr_mm(x, blocks.requires_grad_(), rp, ci).sum().backward()
        elif where == "decompress_bsr":
            sp.decompress_bsr(blocks, rp, ci, 64)
        else:
            lin = fk.nn.SparseLinear.from_dense(torch.nn.Linear(64, 64), format="bsr", block_size=16)
            sd = dict(lin.state_dict(), blocks=blocks, row_ptr=rp, col_idx=ci)
            lin.load_state_dict(sd)


def test_bsr_state_dict_checked_before_loading():
    lin = fk.nn.SparseLinear.from_dense(torch.nn.Linear(64, 64), format="bsr", block_size=16)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    blocks, rp, ci = _bsr()
    rp[1] = 10**6
    with pytest.raises(RuntimeError, match=r"SparseLinear.load_state_dict.*row_ptr"):
        lin.load_state_dict(dict(lin.state_dict(), blocks=blocks, row_ptr=rp, col_idx=ci))
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())
    good = _bsr()
    lin.load_state_dict(dict(lin.state_dict(), blocks=good[0], row_ptr=good[1], col_idx=good[2]))
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), x @ sp.decompress_bsr(*good, 64).t() + lin.bias)


def test_bsr_segfault_reproduction_in_a_subprocess():
    """The issue's one-liner, in its own process: it must exit with a Python error, not a signal."""
    code = ("import torch, fmkernels as fk\n"
            "b, rp, ci = fk.compress_bsr(torch.randn(64, 64), 16); rp[1] = 10**6\n"
            "fk.bsr_mm(torch.randn(4, 64), b, rp, ci)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert r.returncode == 1 and "ValueError" in r.stderr and "row_ptr" in r.stderr, (r.returncode, r.stderr)


def test_index_checks_are_redone_after_an_in_place_change():
    blocks, rp, ci = _bsr()
    x = torch.randn(2, 64)
    sp.bsr_mm(x, blocks, rp, ci)  # valid: passes (and is remembered)
    rp[1] = 10**6  # same tensor object, new version
    with pytest.raises(ValueError, match="row_ptr"):
        sp.bsr_mm(x, blocks, rp, ci)


# ---------------------------------------------------------------- 2:4 metadata


def test_24_duplicate_positions_are_rejected():
    torch.manual_seed(0)
    w = torch.randn(8, 72)
    v, m = sp.compress_24(w, prune=True)
    x = torch.randn(3, 72)
    sp.sparse24_mm(x, v, m)
    dup = m.clone()
    dup[3, 0] = 0  # every group of word 0 of row 3 keeps position 0 twice
    for f in (lambda: sp.sparse24_mm(x, v, dup), lambda: sp.decompress_24(v, dup),
              lambda: sp.sparse24_int8_mm(torch.ones(3, 72, dtype=torch.int8), torch.ones(8, 36, dtype=torch.int8), dup)):
        with pytest.raises(ValueError, match="meta row 3 is not valid 2:4 metadata"):
            f()
    pad = m.clone()
    pad[5, -1] |= 1 << 30  # a padding field (K = 72: 18 groups, the last word holds 2)
    with pytest.raises(ValueError, match="meta row 5"):
        sp.sparse24_mm(x, v, pad)
    lin = fk.nn.SparseLinear.from_dense(torch.nn.Linear(72, 8), format="2:4", prune=True)
    with pytest.raises(RuntimeError, match="2:4 metadata"):
        lin.load_state_dict(dict(lin.state_dict(), meta=dup))


def test_24_fresh_module_has_valid_metadata():
    lin = fk.nn.SparseLinear(64, 16)
    assert lin(torch.randn(2, 64)).shape == (2, 16)


# ---------------------------------------------------------------- devices: no fake kernel on real data


@pytest.mark.parametrize("make", [lambda: Int8Linear(128, 32), lambda: Int4Linear(128, 32),
                                  lambda: torch.nn.Linear(128, 32)], ids=["Int8Linear", "Int4Linear", "nn.Linear"])
def test_meta_module_on_cpu_input_raises(make):
    with torch.device("meta"):
        mod = make()
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        mod(torch.randn(2, 128))


def test_quant_ops_with_meta_weights_raise():
    w = torch.randn(32, 128)
    packed, comp, scale = q.int8_quantize_weight(w)
    meta = lambda t: t.to("meta")  # noqa: E731
    a, a_s = q.quantize_per_row(torch.randn(2, 128))
    with pytest.raises(ValueError, match="int8_mm: b_packed is on meta"):
        q.int8_mm(a, a_s, meta(packed), meta(comp), meta(scale))
    with pytest.raises(ValueError, match="int8_linear: b_packed is on meta"):
        q.int8_linear(torch.randn(2, 128), meta(packed), meta(comp), meta(scale))
    p4, s4, z4 = q.int4_quantize_weight(w)
    with pytest.raises(ValueError, match="int4_mm: w_packed is on meta"):
        q.int4_mm(torch.randn(2, 128), meta(p4), meta(s4), meta(z4), 128, 32)


# ---------------------------------------------------------------- int32 accumulator overflow


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_int8_mm_long_k_never_wraps(backend):
    """K = 140,001 with every product at +-127*128 (a = -128 allowed): the int32 sum would wrap; the op splits K."""
    K = 140_001
    a = torch.full((3, K), 127, dtype=torch.int8)
    a[1] = -128
    a[2, ::2] = -128
    b = torch.full((20, K), 127, dtype=torch.int8)
    b[5] = -127
    packed, comp = q.int8_pack_weight(b)
    want = a.double() @ b.double().t()
    assert want.abs().max() > 2**31  # the case does overflow int32
    y = q.int8_mm(a, torch.ones(3), packed, comp, torch.ones(20), backend=backend)
    assert ((y.double() - want).abs() / want.abs()).max() < 1e-6
    with pytest.raises(ValueError, match="int32 product a @ B\\^T can overflow"):
        q.int8_mm(a, torch.ones(3), packed, comp, torch.ones(20), out_dtype=torch.int32, backend=backend)


def test_int8_linear_long_k_matches_float():
    from fmkernels.testing import sqnr

    torch.manual_seed(0)
    K = 140_004
    lin = torch.nn.Linear(K, 20)
    x = torch.randn(2, K)
    m = Int8Linear.from_linear(lin) if hasattr(Int8Linear, "from_linear") else Int8Linear.from_float(lin)
    with torch.no_grad():
        assert sqnr(lin(x), m(x)) > 30
        packed, comp, scale = q.int8_quantize_weight(lin.weight)
        assert sqnr(lin(x), q.int8_linear(x, packed, comp, scale, lin.bias)) > 30


def test_sparse24_int8_mm_too_long_k_is_an_error():
    K = 262_144 + 4
    x = torch.ones(1, K, dtype=torch.int8)
    v, m = sp.compress_24(torch.ones(2, K, dtype=torch.int8), prune=True)
    with pytest.raises(ValueError, match="too long for an exact int32 result"):
        sp.sparse24_int8_mm(x, v, m)


# ---------------------------------------------------------------- smaller items


def test_fmk_cpu_isa_is_honoured_in_any_case_and_bogus_values_rejected(monkeypatch):
    from fmkernels import _ext

    if not _ext.has_cpu_ext():
        pytest.skip("CPU extension not built")
    for value, want in (("PORTABLE", "portable"), ("Avx2", "avx2"), ("portable", "portable")):
        monkeypatch.setenv("FMK_CPU_ISA", value)
        assert _ext.cpu_ext().isa() in (want, "portable")  # capped (a CPU without AVX2 reports portable)
    monkeypatch.setenv("FMK_CPU_ISA", "PORTABLE")
    x, w = torch.randn(3, 40), torch.randn(40)
    torch.testing.assert_close(fk.rms_norm(x, w, backend="cpu"), fk.rms_norm(x, w, backend="reference"))
    monkeypatch.setenv("FMK_CPU_ISA", "avx9000")
    with pytest.raises(RuntimeError, match="FMK_CPU_ISA must be one of portable, avx2, avx512"):
        fk.rms_norm(x, w, backend="cpu")
    with pytest.raises(ValueError, match="FMK_CPU_ISA"):
        _ext.cpu_ext().isa()
    assert fk.info()["cpu_isa_in_use"].startswith("error: FMK_CPU_ISA")  # fmk info reports it, no traceback


def test_sdpa_accepts_v_with_another_head_dim():
    import torch.nn.functional as F

    q_, k_ = torch.randn(2, 3, 9, 32), torch.randn(2, 3, 11, 32)
    v_ = torch.randn(2, 3, 11, 48)
    torch.testing.assert_close(fk.nn.scaled_dot_product_attention(q_, k_, v_), F.scaled_dot_product_attention(q_, k_, v_))


@pytest.mark.parametrize("window", [(2**40, 0), (2**64, 2**64), (3, 2**63)])
def test_huge_window_sizes_mean_unbounded(window):
    q_ = torch.randn(1, 2, 8, 32)
    want = fk.flash_attention(q_, q_, q_, window_size=tuple(-1 if w > 100 else w for w in window))
    assert torch.equal(fk.flash_attention(q_, q_, q_, window_size=window), want)


def test_attention_module_wrong_input_width():
    att = fk.nn.Attention(64, 4)
    with pytest.raises(ValueError, match=r"Attention: x must have shape \(B, N, dim=64\), got \(2, 5, 63\)"):
        att(torch.randn(2, 5, 63))
    with pytest.raises(ValueError, match="Attention: x must have shape"):
        att(torch.randn(5, 64))


def test_meta_tensors_in_the_loss_give_shapes():
    x = torch.empty(4, 8, device="meta")
    loss = fk.linear_cross_entropy(x, torch.empty(10, 8, device="meta"), torch.empty(4, dtype=torch.long, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
