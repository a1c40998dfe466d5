"""fmkernels.patch on Hugging Face transformers 5.x models (tiny random-init configs), PEFT, torch.compile, Trainer.

Skipped when the `hf` extra (transformers) is absent; `make test` installs it.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import fmkernels as fk  # noqa: E402
from fmkernels.integrations import _attention, _patch  # noqa: E402

HAS = dict.fromkeys(_patch.KINDS, True)  # every kind is part of the build


def llama_config(family="llama", **kw):
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0,
                eos_token_id=1, bos_token_id=2, attn_implementation="sdpa")
    base.update(kw)
    return cfg_cls(**base)


def twin(cls, cfg):
    """Two models with the same weights and their own config objects (a config is shared state: its
    _attn_implementation is what patch() switches)."""
    torch.manual_seed(0)
    a = cls(copy.deepcopy(cfg)).eval()
    b = cls(copy.deepcopy(cfg)).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def test_registered_with_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    a, b = twin(transformers.LlamaForCausalLM, llama_config())
    fk.patch(b)
    assert "fmkernels" in AttentionInterface._global_mapping
    assert "fmkernels" in AttentionMaskInterface._global_mapping
    assert b.config._attn_implementation == "fmkernels" and a.config._attn_implementation == "sdpa"
    fk.unpatch(b)
    assert b.config._attn_implementation == "sdpa"


def _attention_fn():
    from transformers import AttentionInterface

    from fmkernels.integrations import hf

    hf.register()
    return AttentionInterface._global_mapping["fmkernels"]


class _Mod(torch.nn.Module):
    def __init__(self, causal, groups):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups
        self._fmkernels_stats = {}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(7, 7), (1, 9), (5, 12)])
def test_attention_function_contract(causal, nq, nk):
    """(B, Hq, Nq, D) q with unrepeated (B, Hkv, Nk, D) k/v in, (output (B, Nq, Hq, D), None) out, causal read from
    module.is_causal, scaling keyword, as transformers' own sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fn = _attention_fn()
    q = torch.randn(2, 4, nq, 16)
    k, v = torch.randn(2, 2, nk, 16), torch.randn(2, 2, nk, 16)
    mod = _Mod(causal, 2)
    out, w = fn(mod, q, k, v, None, dropout=0.0, scaling=0.3)
    ref, _ = sdpa_attention_forward(mod, q, k, v, None, dropout=0.0, scaling=0.3)
    assert w is None and out.shape == (2, nq, 4, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert mod._fmkernels_stats == {"attention_fused": 1}
    # a padding mask (bool, True = attend) cannot be expressed by the kernel: reference path, counted
    mask = torch.ones(2, 1, nq, nk, dtype=torch.bool)
    mask[1, ..., :2] = False
    out, _ = fn(mod, q, k, v, mask, dropout=0.0, scaling=0.3)
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert mod._fmkernels_stats["attention_fallback_mask"] == 1


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_family_patched_matches(family):
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[family]
    ref, m = twin(cls, llama_config(family))
    ids = torch.randint(3, 256, (2, 24))
    labels = ids.clone()
    logits_before = m(ids).logits
    report = fk.patch(m)
    assert report.replaced["attention"] == 2
    assert report.replaced["rms_norm"] == 5
    for kind in ("rope", "swiglu", "cross_entropy"):
        assert (kind in report.replaced) == HAS[kind], (kind, report)
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    # padded batch (right padding): the mask path
    am = torch.ones_like(ids)
    am[1, 17:] = 0
    torch.testing.assert_close(m(ids, attention_mask=am).logits, ref(ids, attention_mask=am).logits,
                               rtol=1e-4, atol=1e-4)
    assert report.calls["attention_fused"] >= 2 and report.calls["attention_fallback_mask"] >= 2
    # training step: loss and gradients
    m.train()
    ref.train()
    out, out_ref = m(ids, labels=labels), ref(ids, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
    if HAS["cross_entropy"]:
        assert out.logits is None and report.calls["cross_entropy_fused"] == 1
    m.eval()
    fk.unpatch(m)
    assert m.config._attn_implementation == "sdpa"
    assert all(not type(x).__dict__.get("_fmkernels_orig_class") for x in m.modules())
    assert torch.equal(m(ids).logits, logits_before)


def test_llama_bf16_autocast_is_fused():
    """Under bf16 autocast HF's RoPE hands fp32 q/k and bf16 v to attention (SDPA casts them under autocast):
    the fused path must do the same, not fall back."""
    ref, m = twin(transformers.LlamaForCausalLM, llama_config())
    report = fk.patch(m)
    ids = torch.randint(3, 256, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = m(ids).logits.float(), ref(ids).logits.float()
    exact = ref(ids).logits
    assert report.calls == {"attention_fused": 2}, report.calls
    # error vs the fp32 model within 2x what plain PyTorch's bf16 autocast makes, plus a floor
    assert (out - exact).abs().max() <= 2 * (out_ref - exact).abs().max() + 1e-2
    fk.unpatch(m)


def test_llama_generate_kv_cache_identical_tokens():
    ref, m = twin(transformers.LlamaForCausalLM, llama_config())
    report = fk.patch(m)
    ids = torch.randint(3, 256, (3, 12))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding
    am[2, :7] = 0
    ids = ids.masked_fill(am == 0, 0)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    g_ref = ref.generate(ids, attention_mask=am, **kw)
    g = m.generate(ids, attention_mask=am, **kw)
    assert torch.equal(g, g_ref)
    fallbacks = report.calls.get("attention_fallback_mask", 0)
    assert fallbacks > 0  # left padding: every step has a padding mask
    # unpadded batch: prefill causal and decode steps (Nq = 1, Nk > 1) through the fused kernel
    ids2 = torch.randint(3, 256, (2, 12))
    fused = report.calls.get("attention_fused", 0)
    g_ref = ref.generate(ids2, attention_mask=torch.ones_like(ids2), **kw)
    g = m.generate(ids2, attention_mask=torch.ones_like(ids2), **kw)
    assert torch.equal(g, g_ref)
    assert report.calls["attention_fused"] - fused == 2 * 10  # 2 layers x (1 prefill + 9 decode steps)
    assert report.calls.get("attention_fallback_mask", 0) == fallbacks
    fk.unpatch(m)


def test_bert_and_gpt2_attention():
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, attn_implementation="sdpa")
    ref, m = twin(transformers.BertModel, cfg)
    ids = torch.randint(0, 128, (2, 10))
    am = torch.ones_like(ids)
    am[0, 7:] = 0
    r = fk.patch(m)
    assert r.replaced["attention"] == 2 and "rms_norm" in r.skipped
    torch.testing.assert_close(m(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m(ids, attention_mask=am).last_hidden_state,
                               ref(ids, attention_mask=am).last_hidden_state, rtol=1e-4, atol=1e-4)
    # a right-padded bidirectional batch: the kernel per sequence on its valid keys
    assert r.calls["attention_fused"] == 2 and r.calls["attention_fused_varlen"] == 2 and not r.fallbacks
    m.train()
    ref.train()
    for mod in list(m.modules()) + list(ref.modules()):
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    m.config.attention_probs_dropout_prob = ref.config.attention_probs_dropout_prob = 0.0
    m(ids, attention_mask=am).last_hidden_state.square().mean().backward()
    ref(ids, attention_mask=am).last_hidden_state.square().mean().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
    # a mask that is not key padding (a hole in the middle): the reference path, counted
    am2 = torch.ones_like(ids)
    am2[1, 3] = 0
    m.eval()
    ref.eval()
    torch.testing.assert_close(m(ids, attention_mask=am2).last_hidden_state,
                               ref(ids, attention_mask=am2).last_hidden_state, rtol=1e-4, atol=1e-4)
    assert r.calls["attention_fallback_mask"] == 2
    fk.unpatch(m)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  attn_implementation="sdpa")
    ref, m = twin(transformers.GPT2LMHeadModel, cfg)
    r = fk.patch(m)
    assert r.replaced["attention"] == 2
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert r.calls["attention_fused"] == 2
    fk.unpatch(m)


def test_compile_fullgraph_patched_llama_matches_eager():
    ref, m = twin(transformers.LlamaForCausalLM, llama_config())
    fk.patch(m)
    m.train()
    ref.train()
    ids = torch.randint(3, 256, (2, 24))  # Nq > 16: fp32 decoding-size calls dispatch to the reference
    torch._dynamo.reset()
    mc = torch.compile(m, fullgraph=True)
    logits = mc(ids).logits
    torch.testing.assert_close(logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    F.cross_entropy(ref(ids).logits.flatten(0, 1), ids.flatten()).backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
    # one graph, and the fmkernels ops are in it (not run around it)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(m, fullgraph=True, backend=record)(ids)
    assert len(graphs) == 1
    expected = ["rms_norm_fwd"] + [name for kind, name in (("attention", "flash_attention_fwd"), ("rope", "rope"),
                                                           ("swiglu", "swiglu")) if HAS[kind]]
    if os.environ.get("FMK_BACKEND") != "reference":  # reference backends are plain PyTorch, not custom ops
        for name in expected:
            assert f"fmkernels.{name}" in graphs[0], name
    fk.unpatch(m)
    torch._dynamo.reset()


def _lora(model):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def _train(model, ids, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_peft_lora_patch_before_and_after_wrapping():
    ids = torch.randint(3, 256, (2, 16))
    ref, m = twin(transformers.LlamaForCausalLM, llama_config())
    torch.manual_seed(1)
    ref_l = _lora(ref)
    base_losses = _train(ref_l.train(), ids)
    # patch, then wrap
    _, m1 = twin(transformers.LlamaForCausalLM, llama_config())
    r1 = fk.patch(m1)
    torch.manual_seed(1)
    p1 = _lora(m1)
    l1 = _train(p1.train(), ids)
    # wrap, then patch
    _, m2 = twin(transformers.LlamaForCausalLM, llama_config())
    torch.manual_seed(1)
    p2 = _lora(m2)
    r2 = fk.patch(p2)
    l2 = _train(p2.train(), ids)
    assert base_losses[-1] < base_losses[0]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(base_losses), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(base_losses), rtol=1e-4, atol=1e-4)
    assert r1.calls["attention_fused"] > 0 and r2.calls["attention_fused"] > 0
    assert r2.replaced["attention"] == 2 and r2.replaced["rms_norm"] == 5
    fk.unpatch(p2)


def test_trainer_loss_curve_matches(tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(3, 256, (16, 24))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i], "attention_mask": torch.ones_like(ids[i])}

    def run(patch):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(llama_config())
        if patch:
            fk.patch(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(patch)), per_device_train_batch_size=4, max_steps=4,
                                 learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                 use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
        tr = Trainer(model=model, args=args, train_dataset=DS())
        tr.train()
        return [h["loss"] for h in tr.state.log_history if "loss" in h]

    base, patched = run(False), run(True)
    assert len(base) == 4
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(base), rtol=1e-4, atol=1e-4)
