"""Transformer (fmkernels ops) vs its plain-PyTorch twin: same weights -> same outputs and gradients, and the
same loss curve over 100 training steps on real text (the convergence test)."""
import numpy as np
from trainer_helpers import stdlib_bytes  # noqa: F401  (fixture)
import pytest
import torch

from fmkernels.models import (PRESETS, ConfigError, PlainTransformer, Transformer, TransformerConfig,
                              fmk_to_plain_state_dict, plain_to_fmk_state_dict)


def _pair(**kw):
    cfg = TransformerConfig(**{**dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32), **kw})
    torch.manual_seed(0)
    fm = Transformer(cfg)
    pl = PlainTransformer(cfg)
    pl.load_state_dict(fmk_to_plain_state_dict(fm.state_dict(), cfg))
    return cfg, fm, pl


@pytest.mark.parametrize("tie", [True, False])
def test_same_weights_same_logits_loss_and_grads(tie):
    cfg, fm, pl = _pair(tie_embeddings=tie)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (3, 17), generator=g)
    y = torch.randint(0, 97, (3, 17), generator=g)
    torch.testing.assert_close(fm(x), pl(x), rtol=1e-4, atol=1e-5)
    lf, lp = fm(x, y), pl(x, y)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    lf.backward()
    lp.backward()
    gf = fmk_to_plain_state_dict({n: p.grad for n, p in fm.named_parameters()}, cfg)
    for n, p in pl.named_parameters():
        torch.testing.assert_close(gf[n], p.grad, rtol=1e-3, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_state_dict_round_trip():
    cfg, fm, pl = _pair()
    back = plain_to_fmk_state_dict(pl.state_dict(), cfg)
    for k, v in fm.state_dict().items():
        assert torch.equal(back[k], v), k


def test_bf16_autocast_forward_close():
    cfg, fm, pl = _pair()
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lf, lp = fm(x, y), pl(x, y)
    ref = fm(x, y)
    assert abs(lf.item() - ref.item()) <= 2 * abs(lp.item() - ref.item()) + 2e-2


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"n_heads \(5\) must divide dim \(64\)"):
        TransformerConfig(dim=64, n_heads=5)
    with pytest.raises(ConfigError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        TransformerConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="vocab_size must be a positive integer"):
        TransformerConfig(vocab_size=0)
    with pytest.raises(ConfigError, match="dropout"):
        TransformerConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="unknown field"):
        TransformerConfig.from_dict({"dims": 3})


def test_presets_build_and_param_counts():
    for name, kw in PRESETS.items():
        cfg = TransformerConfig(vocab_size=256, **kw)
        if name in ("tiny", "small"):
            assert Transformer(cfg).num_params() == cfg.num_params()
    assert 0.7e9 < TransformerConfig(vocab_size=32000, **PRESETS["xl"]).num_params() < 1.3e9


def test_sequence_too_long():
    _, fm, _ = _pair()
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        fm(torch.zeros(1, 33, dtype=torch.long))


def test_dropout_and_activation_checkpointing_run():
    from fmkernels.train.parallel import apply_activation_checkpointing

    cfg, fm, _ = _pair(dropout=0.1)
    apply_activation_checkpointing(fm)
    x = torch.randint(0, 97, (2, 16))
    fm.train()
    fm(x, x).backward()
    assert all(p.grad is not None for p in fm.parameters())
    assert set(fm.state_dict()) == set(Transformer(cfg).state_dict())


def test_convergence_matches_plain_pytorch_over_100_steps(stdlib_bytes):
    """Train both from the same weights on the same stdlib batches for 100 steps: the loss curves agree."""
    cfg, fm, pl = _pair(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    from fmkernels.data import BatchSampler

    sampler = BatchSampler(stdlib_bytes, 64, 8, seed=0)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for m in (fm, pl)]
    curves = [[], []]
    for step in range(100):
        x, y = sampler.batch(step)
        for i, (m, o) in enumerate(zip((fm, pl), opts)):
            loss = m(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
            o.zero_grad()
            curves[i].append(loss.item())
    a, b = np.array(curves[0]), np.array(curves[1])
    assert a[-10:].mean() < a[:10].mean() - 1.0, "the model did not learn"
    # same curve: per-step difference small relative to how far the loss moved
    assert np.abs(a - b).max() < 0.05, f"max per-step loss gap {np.abs(a - b).max():.4f}"
    assert abs(a[-10:].mean() - b[-10:].mean()) < 0.02


# --- KV cache (incremental decoding) ---------------------------------------------------------------------------

def _decoder(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
@pytest.mark.parametrize("chunks", [(7, 1, 1, 1), (1,) * 6, (5, 4, 3)])
def test_kv_cache_logits_match_full_forward(chunks, attention):
    """Feeding a sequence in chunks through the cache gives the logits of one full causal forward."""
    m = _decoder(attention=attention)
    idx = torch.randint(0, 97, (2, sum(chunks)))
    with torch.no_grad():
        full = m(idx)  # (2, N, V)
        cache, parts, s = m.new_cache(batch_size=2), [], 0
        for n in chunks:
            parts.append(m(idx[:, s : s + n], cache=cache))
            s += n
    assert cache.length == idx.shape[1]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_kv_cache_greedy_generation_matches_uncached():
    from fmkernels.train.generate import generate_ids
    m = _decoder(seed=1)
    prompt = [3, 14, 15, 92, 65]
    cached = generate_ids(m, prompt, max_new_tokens=20, temperature=0, use_cache=True)
    plain = generate_ids(m, prompt, max_new_tokens=20, temperature=0, use_cache=False)
    assert cached == plain and len(cached) == 20
    # past max_seq_len (32) the cache refills from the newest half of the context and keeps going
    long = generate_ids(m, prompt, max_new_tokens=60, temperature=0.8, top_k=10, seed=3)
    assert len(long) == 60 and all(0 <= t < 97 for t in long)


def test_kv_cache_bad_use_raises():
    m = _decoder()
    cache = m.new_cache(batch_size=1, capacity=8)
    with torch.no_grad():
        m(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="no room"):
            m(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            m(torch.zeros(2, 1, dtype=torch.long), cache=m.new_cache(batch_size=1))
    with pytest.raises(ValueError, match="capacity"):
        m.new_cache(capacity=64)


def test_compile_fullgraph_training_step_matches_eager():
    """The whole model, fused loss included, traces into one graph (trainer --compile true): same loss and grads."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    m = Transformer(cfg)
    x = torch.randint(0, 97, (2, 24))
    y = torch.randint(0, 97, (2, 24))
    torch._dynamo.reset()
    mc = torch.compile(m, fullgraph=True, backend="aot_eager")
    grads = []
    for model in (m, mc):
        m.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
