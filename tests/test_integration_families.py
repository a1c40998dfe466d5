"""fmkernels.patch on every decoder family of a list of transformers' own model types (tiny random configs):
the patched model must compute what the unpatched eager model computes, including what only eager code computes
(Gemma 2's attention-logit softcapping, GPT-OSS's sinks): issue 15, bug 2.

The list is the families whose attention goes through transformers' AttentionInterface (what patch() claims);
a family missing from the installed transformers is skipped.
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import fmkernels as fk  # noqa: E402
from fmkernels.integrations import _attention, _patch  # noqa: E402,F401

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "starcoder2",
            "cohere", "granite", "gpt_oss", "gpt2", "smollm3"]
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0,
            eos_token_id=1, bos_token_id=2, n_embd=64, n_layer=2, n_head=4, n_positions=128,
            num_local_experts=2, num_experts_per_tok=1, sliding_window=8, layer_types=None, tie_word_embeddings=False,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)  # dropout off: train == eval


def _config(family):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} ships no {family}")
    kw = {k: v for k, v in TINY.items() if hasattr(CONFIG_MAPPING[family](), k)}
    if family == "gemma2":
        kw.update(attn_logit_softcapping=5.0, final_logit_softcapping=None)  # small cap: softcapping bites
    return AutoConfig.for_model(family, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_family_matches_eager(family):
    from transformers import AutoModelForCausalLM

    cfg = _config(family)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
    m.load_state_dict(ref.state_dict())
    ids = torch.randint(3, cfg.vocab_size, (2, 20))
    am = torch.ones_like(ids)
    am[1, 14:] = 0
    report = fk.patch(m)
    assert report.replaced.get("attention", 0) >= 1, report
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m(ids, attention_mask=am).logits[0], ref(ids, attention_mask=am).logits[0],
                                   rtol=1e-4, atol=1e-4)
        keep = am[1].bool()
        torch.testing.assert_close(m(ids, attention_mask=am).logits[1][keep], ref(ids, attention_mask=am).logits[1][keep],
                                   rtol=1e-4, atol=1e-4)
    # training step: loss and gradients through whatever path each call took
    m.train()
    ref.train()
    out, out_ref = m(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    out_ref.loss.backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)
    fk.unpatch(m)


def test_gemma2_softcap_runs_eager_and_matters():
    """The fallback keeps softcapping: the patched Gemma 2 differs from the same model computed without the cap,
    and every attention call it made went through the model's own eager code (the model declares no SDPA)."""
    from transformers import AutoModelForCausalLM

    cfg = _config("gemma2")
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
    nocap = AutoModelForCausalLM.from_config(copy.deepcopy(cfg).__class__(**{**cfg.to_dict(),
                                                                            "attn_logit_softcapping": None}),
                                             attn_implementation="eager").eval()
    nocap.load_state_dict(m.state_dict())
    ids = torch.randint(3, cfg.vocab_size, (1, 16))
    report = fk.patch(m)
    with torch.no_grad():
        y = m(ids).logits
        assert (y - nocap(ids).logits).abs().max() > 1e-3
    # layer 0 slides (a mask: "fallback_mask"), layer 1 is global (no mask: "fallback_softcap"); both eager
    assert report.calls.get("attention_fallback_softcap", 0) >= 1 and sum(report.fallbacks.values()) >= 2, report.calls
    assert not any(k == "attention_fused" for k in report.calls), report.calls
