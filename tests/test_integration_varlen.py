"""patch() on padded and packed batches: no attention fallback, logits equal to transformers' own (and to each
document run on its own)."""
import copy

import pytest
import torch

import fmkernels as fk

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                   initializer_range=0.2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(copy.deepcopy(cfg)).eval()
    b = transformers.LlamaForCausalLM(copy.deepcopy(cfg)).eval()
    b.load_state_dict(a.state_dict())
    return a, b


DOCS = [10, 1, 8, 5]


def _packed_inputs():
    ids = torch.randint(3, 256, (1, sum(DOCS)))
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    cu = torch.tensor([0] + torch.tensor(DOCS).cumsum(0).tolist(), dtype=torch.int32)
    return ids, pos, cu


def _per_document(model, ids):
    outs, s = [], 0
    for n in DOCS:
        outs.append(model(ids[:, s:s + n]).logits)
        s += n
    return torch.cat(outs, 1)


def test_packed_position_ids_route_to_varlen():
    ref, m = _llama()
    ids, pos, _ = _packed_inputs()
    report = fk.patch(m)
    with torch.no_grad():
        # transformers builds the block-diagonal mask from restarting position_ids without a cache
        out = m(ids, position_ids=pos, use_cache=False).logits
        exp = ref(ids, position_ids=pos, use_cache=False).logits
        alone = _per_document(ref, ids)
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)  # no leaks across documents
    assert report.calls["attention_fused_varlen"] == 2 and not report.fallbacks
    fk.unpatch(m)


def test_packed_cu_seq_lens_kwargs_route_to_varlen():
    ref, m = _llama()
    ids, pos, cu = _packed_inputs()
    report = fk.patch(m)
    kw = dict(position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(DOCS), max_length_k=max(DOCS))
    with torch.no_grad():
        out = m(ids, **kw).logits
        alone = _per_document(ref, ids)
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)
    assert report.calls["attention_fused_varlen"] == 2 and not report.fallbacks
    fk.unpatch(m)


def test_packed_training_gradients_match():
    ref, m = _llama()
    ids, pos, _ = _packed_inputs()
    fk.patch(m)
    m.train()
    ref.train()
    m(ids, position_ids=pos, labels=ids).loss.backward()
    ref(ids, position_ids=pos, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
    fk.unpatch(m)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_and_no_fallback(side):
    ref, m = _llama()
    ids = torch.randint(3, 256, (3, 20))
    am = torch.ones_like(ids)
    if side == "left":
        am[1, :6] = 0
        am[2, :19] = 0
    else:
        am[1, 14:] = 0
        am[2, 1:] = 0
    report = fk.patch(m)
    with torch.no_grad():
        out = m(ids, attention_mask=am).logits
        exp = ref(ids, attention_mask=am).logits
    keep = am.bool()
    torch.testing.assert_close(out[keep], exp[keep], rtol=1e-4, atol=1e-4)
    assert report.calls["attention_fused_varlen"] == 2 and not report.fallbacks
    fk.unpatch(m)


def test_left_padded_greedy_generate_bf16_autocast_no_fallback():
    ref, m = _llama()
    ids = torch.randint(3, 256, (2, 9))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    ids = ids.masked_fill(am == 0, 0)
    report = fk.patch(m)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    g = m.generate(ids, attention_mask=am, **kw)
    g_ref = ref.generate(ids, attention_mask=am, **kw)
    assert torch.equal(g, g_ref)
    assert not report.fallbacks and report.calls["attention_fused_varlen"] == 2 * 6
    fk.unpatch(m)
