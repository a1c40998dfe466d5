"""fmkernels.patch / unpatch on plain PyTorch models (no transformers needed)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmkernels as fk
from fmkernels.integrations import _attention, _patch  # noqa: F401


class Block(nn.Module):
    def __init__(self, d=64, h=4, hkv=2):
        super().__init__()
        self.h, self.hkv, self.dh = h, hkv, d // h
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * hkv * self.dh)
        self.o = nn.Linear(d, d)

    def forward(self, x, mask=None):
        B, N, D = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, N, self.h, self.dh).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(h).view(B, N, 2, self.hkv, self.dh).permute(2, 0, 3, 1, 4)  # (B, Hkv, N, Dh) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(B, N, D))


class Plain(nn.Module):
    def __init__(self, d=64, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = b(x, mask)
        return self.norm(x)


def _twin():
    a = Plain()
    b = Plain()
    b.load_state_dict(a.state_dict())
    return a, b


def test_import_fmkernels_does_not_import_transformers():
    code = textwrap.dedent(
        """
        import sys, torch, fmkernels as fk
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.RMSNorm(4))
        r = fk.patch(m)
        fk.unpatch(m)
        print("LOADED", sorted(n for n in ("transformers", "peft", "accelerate") if n in sys.modules))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout


def test_plain_model_patched_matches_and_unpatch_restores_exactly():
    ref, m = _twin()
    x = torch.randn(2, 33, 64)
    y_ref = ref(x)
    before = m(x)
    rms_before = [type(mod) for mod in m.modules()]
    report = fk.patch(m)
    assert report.model is m
    assert fk.integrations.get_report(m) is report
    assert report.replaced["rms_norm"] == 3
    assert report.replaced["attention"] == 1
    assert sum(isinstance(mod, fk.nn.RMSNorm) for mod in m.modules()) == 3
    for kind in ("rope", "swiglu", "cross_entropy"):
        assert kind in report.skipped and report.skipped[kind]
    y = m(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert report.calls.get("attention_fused") == 2 and not report.fallbacks
    # gradients flow to the original parameters (the RMSNorm weight is shared, not copied)
    y.square().mean().backward()
    ref(x).square().mean().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert set(dict(m.named_parameters())) == set(dict(ref.named_parameters()))
    fk.unpatch(m)
    assert [type(mod) for mod in m.modules()] == rms_before
    assert type(m) is Plain
    assert "_fmkernels_stats" not in m.__dict__
    assert torch.equal(m(x), before)


def test_plain_masked_call_falls_back_and_is_counted():
    ref, m = _twin()
    report = fk.patch(m)
    x = torch.randn(2, 9, 64)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    mask[:, 0] = True
    torch.testing.assert_close(m(x, mask), ref(x, mask), rtol=1e-5, atol=1e-5)
    assert report.fallbacks == {"attention_fallback_mask": 2}
    fk.unpatch(m)


def test_other_instance_of_same_class_untouched():
    a, b = _twin()
    fk.patch(a)
    assert type(b) is Plain and all(type(mod) is nn.RMSNorm for mod in b.modules() if "RMSNorm" in type(mod).__name__)
    x = torch.randn(1, 5, 64)
    b(x)
    assert fk.integrations.get_report(a).calls.get("attention_fused") is None  # b's calls are not routed
    fk.unpatch(a)


def test_patch_options_and_errors():
    m = Plain()
    r = fk.patch(m, attention=False, rms_norm=False)
    assert r.skipped["attention"] == "disabled by the caller" and r.skipped["rms_norm"] == "disabled by the caller"
    assert not r.replaced
    with pytest.raises(ValueError, match="already patched"):
        fk.patch(m)
    fk.unpatch(m)
    with pytest.raises(ValueError, match="not patched"):
        fk.unpatch(m)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fk.patch(object())
    with pytest.raises(TypeError, match="quantization config"):
        fk.patch(m, linear="int8")
    assert fk.integrations.get_report(m) is None  # the failed patch left nothing behind
    assert all(type(mod) is not fk.nn.RMSNorm for mod in m.modules())
    assert "skipped" in str(r)


def test_compile_fullgraph_plain_model_matches_eager():
    ref, m = _twin()
    fk.patch(m)
    x = torch.randn(2, 17, 64)
    torch._dynamo.reset()
    mc = torch.compile(m, fullgraph=True)
    y = mc(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    fk.unpatch(m)
    torch._dynamo.reset()


def test_fused_attention_uses_fmkernels_flash_attention(monkeypatch):
    calls = []
    real = fk.ops.flash_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    m = Plain()
    fk.patch(m)
    monkeypatch.setattr(fk.ops, "flash_attention", spy)
    m(torch.randn(1, 5, 64))
    assert len(calls) == 2
    fk.unpatch(m)


def test_fmkernels_own_models():
    """fmkernels.models.Transformer already runs on fmkernels ops (every kind reported as such); its plain-PyTorch
    twin (nn.RMSNorm, F.scaled_dot_product_attention) is patched like any plain model and matches."""
    try:
        models = fk.models
    except AttributeError as e:
        pytest.skip(f"fmkernels.models is not part of this build ({e})")
    cfg = models.TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    m = models.Transformer(cfg)
    r = fk.patch(m)
    assert not r.replaced and all("already runs on fmkernels ops" in r.skipped[k] or "not part" in r.skipped[k]
                                  for k in ("attention", "rms_norm"))
    fk.unpatch(m)
    ref, plain = models.PlainTransformer(cfg), models.PlainTransformer(cfg)
    plain.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 64, (2, 20))
    r = fk.patch(plain)
    assert r.replaced["rms_norm"] == 2 * 2 + 1 and r.replaced["attention"] == 1
    torch.testing.assert_close(plain(idx), ref(idx), rtol=1e-4, atol=1e-4)
    assert r.calls["attention_fused"] == 2
    fk.unpatch(plain)
