"""Smart data selection (select_mode online / offline, RHO-loss reference): each test fails if selection silently
picked something else. Stub models with known per-row losses; tiny Transformers, byte tokenizer, a few steps."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_helpers import small_corpus  # noqa: F401  (fixture)

from fmkernels.models import Transformer
from fmkernels.models.config import ConfigError, TransformerConfig
from fmkernels.train import TrainConfig, train
from fmkernels.train.selection import (OfflineSelectionSampler, OnlineSelectionSampler, Scorer, forward_flops_per_token,
                                       keep_top_fraction, per_example_loss, score_windows, select_top,
                                       train_flops_per_token, window_starts)

V = 16


class Fixed(nn.Module):
    """forward(x) -> the same logits (V,) at every position: known loss per target token."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(*x.shape, V).clone()  # (B, T, V)


def _logits(**hot):
    z = [0.0] * V
    for tok, v in hot.items():
        z[int(tok[1:])] = v
    return z


# M predicts 0 strongly and 1 moderately; R (the reference) predicts 1 strongly.
M = Fixed(_logits(t0=10.0, t1=5.0))
R = Fixed(_logits(t1=10.0))


def _rows(kind, n, T, rng):
    if kind == "a":
        return np.zeros((n, T + 1), dtype=np.int64)  # M: low loss, R: high
    if kind == "b":
        return np.ones((n, T + 1), dtype=np.int64)  # M: medium loss (~5), R: low
    return rng.integers(2, V, size=(n, T + 1))  # M: high loss (~10), R: high (~10): noise for both


def test_per_example_loss_matches_cross_entropy_fused_and_plain_paths():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16)
    model = Transformer(cfg).eval()
    x, y = torch.randint(0, 64, (5, 16)), torch.randint(0, 64, (5, 16))
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(5, 16).mean(1)
    got = per_example_loss(model, x, y)  # fused hidden_states + linear_cross_entropy path
    assert got.shape == (5,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_example_loss(M, x % V, y % V),
                               F.cross_entropy(M(x).flatten(0, 1), (y % V).flatten(), reduction="none").view(5, 16).mean(1))


def test_select_top_orders_and_breaks_ties_by_index():
    s = torch.tensor([0.5, 2.0, 1.0, 2.0, -1.0])
    assert select_top(s, 3).tolist() == [1, 3, 2]
    with pytest.raises(ValueError, match="k must be"):
        select_top(s, 0)
    with pytest.raises(ValueError, match="k must be"):
        select_top(s, 6)


def test_online_selection_picks_the_highest_loss_candidates():
    T, rng = 8, np.random.default_rng(0)
    # a corpus made of 3 kinds of stretches; candidates are random windows of it
    tokens = np.concatenate([_rows(k, 1, 40 * T, rng)[0] for k in "abcabc"]).astype(np.uint16)
    sampler = OnlineSelectionSampler(tokens, T, batch_size=4, ratio=0.25, scorer=Scorer(lambda: M), device="cpu", seed=3)
    assert sampler.n_candidates == 16
    for step in range(3):
        x, y = sampler.batch(step)
        cx, cy = sampler.candidates.batch(step)  # the same candidates, drawn again
        losses = F.cross_entropy(M(cx).flatten(0, 1), cy.flatten(), reduction="none").view(16, T).mean(1)
        top = torch.argsort(losses, descending=True, stable=True)[:4]
        assert torch.equal(x, cx[top]) and torch.equal(y, cy[top])
        assert x.shape == (4, T)
        # every picked window has a loss >= every window left out
        left = torch.ones(16, dtype=torch.bool)
        left[top] = False
        assert losses[top].min() >= losses[left].max()


def test_reference_mode_subtracts_the_reference_loss_and_changes_the_pick():
    T, rng = 6, np.random.default_rng(1)
    x = torch.from_numpy(np.concatenate([_rows(k, 3, T, rng) for k in "abc"]))  # rows 0-2 a, 3-5 b, 6-8 c
    inp, tgt = x[:, :-1], x[:, 1:]
    plain = Scorer(lambda: M)(inp, tgt)
    rho = Scorer(lambda: M, R)(inp, tgt)
    torch.testing.assert_close(rho, per_example_loss(M, inp, tgt) - per_example_loss(R, inp, tgt))
    assert sorted(select_top(plain, 3).tolist()) == [6, 7, 8]  # loss alone: the noise rows (c)
    assert sorted(select_top(rho, 3).tolist()) == [3, 4, 5]  # learnable, not yet learnt (b)


def test_scorer_restores_training_mode():
    m = Fixed(_logits(t0=1.0)).train()
    Scorer(lambda: m)(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    assert m.training


def test_offline_keeps_the_top_fraction_and_samples_only_from_it():
    T, rng = 8, np.random.default_rng(2)
    kinds = "abcacbbaca"  # 10 windows, 3 of kind c
    tokens = np.concatenate([_rows(k, 1, T - 1, rng)[0][: T] for k in kinds] + [np.zeros(1, np.int64)])
    starts = window_starts(len(tokens), T)
    assert len(starts) == 10 and starts[1] == T
    scores = score_windows(tokens, starts, T, Scorer(lambda: M), "cpu", batch_size=4)
    for i, s in enumerate(starts):
        w = torch.from_numpy(tokens[s : s + T + 1])[None]
        assert math.isclose(scores[i], float(per_example_loss(M, w[:, :-1], w[:, 1:])), rel_tol=1e-6)
    keep = keep_top_fraction(scores, 0.3)
    assert [kinds[i] for i in keep] == ["c", "c", "c"]
    assert keep_top_fraction(np.array([3.0, 1.0, 2.0, 0.0]), 0.5).tolist() == [0, 2]
    assert keep_top_fraction(np.array([3.0, 1.0]), 0.01).tolist() == [0]  # at least one
    sampler = OfflineSelectionSampler(tokens, starts[keep], T, batch_size=16, seed=0)
    seen = set()
    for step in range(5):
        x, y = sampler.batch(step)
        assert x.shape == (16, T) and torch.equal(x[:, 1:], y[:, :-1])
        for row in x:
            match = [s for s in starts[keep] if np.array_equal(tokens[s : s + T], row.numpy())]
            assert match, "a window outside the kept set was sampled"
            seen.add(int(match[0]))
    assert seen == set(starts[keep].tolist())
    with pytest.raises(ValueError, match="fraction"):
        keep_top_fraction(scores, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        keep_top_fraction(scores, 1.5)


# ---------------------------------------------------------------- the trainer switch
TINY = dict(preset="tiny", tokenizer="byte", seq_len=32, batch_size=4, progress=False, sample_tokens=0,
            eval_every=1000, log_every=1, final_eval=False, warmup_steps=0, lr=1e-2, dtype="fp32")


def _cfg(out, corpus, **kw):
    return TrainConfig.build(None, dict(TINY, out_dir=str(out), corpus=str(corpus), **kw))


@pytest.fixture(scope="module")
def scorer_run(tmp_path_factory):
    from fmkernels.data import stdlib_files

    root = tmp_path_factory.mktemp("sel")
    c = root / "corpus"
    c.mkdir()
    for rel, path in stdlib_files()[:12]:
        (c / rel.replace("/", "__")).write_bytes(path.read_bytes())
    s = train(_cfg(root / "ref", c, max_steps=5), log=lambda m: None)
    assert s["exit_code"] == 0
    return dict(corpus=c, ref=root / "ref")


def test_online_run_trains_on_selected_batches_and_counts_scoring_flops(scorer_run, tmp_path):
    from fmkernels.train.trainer import Trainer

    cfg = _cfg(tmp_path / "on", scorer_run["corpus"], max_steps=3, select_mode="online", select_ratio=0.5,
               select_reference=str(scorer_run["ref"]))
    t = Trainer(cfg, log=lambda m: None)
    s = t.run()
    assert s["exit_code"] == 0 and s["select_candidates"] == 8
    sampler = t.sampler
    assert isinstance(sampler, OnlineSelectionSampler) and sampler.scorer.reference is not None
    assert sampler.last_picked.tolist() == select_top(sampler.last_scores, 4).tolist()
    mcfg = t.mcfg
    train_f = train_flops_per_token(mcfg, 32) * 4 * 32
    score_f = 2 * forward_flops_per_token(mcfg, 32) * 8 * 32  # model + reference, 8 candidates
    assert s["flops"] == pytest.approx(3 * (train_f + score_f), rel=1e-9)
    base = train(_cfg(tmp_path / "uni", scorer_run["corpus"], max_steps=3), log=lambda m: None)
    assert base["flops"] == pytest.approx(3 * train_f, rel=1e-9)


def test_offline_run_scores_once_and_counts_it(scorer_run, tmp_path):
    from fmkernels.train.trainer import Trainer

    cfg = _cfg(tmp_path / "off", scorer_run["corpus"], max_steps=2, select_mode="offline", select_ratio=0.25,
               select_scorer=str(scorer_run["ref"]))
    t = Trainer(cfg, log=lambda m: None)
    s = t.run()
    n = s["select_windows"]
    assert s["select_kept"] == round(n * 0.25) and n == (len(t.data.train) - 1) // 32
    mcfg = t.mcfg
    want = forward_flops_per_token(mcfg, 32) * n * 32 + 2 * train_flops_per_token(mcfg, 32) * 4 * 32
    assert s["flops"] == pytest.approx(want, rel=1e-9)
    assert s["train_time_s"] >= t.selection.upfront_time_s > 0


@pytest.mark.parametrize("kw, field", [
    (dict(select_mode="sometimes"), "select_mode"),
    (dict(select_mode="online", select_ratio=0.0), "select_ratio"),
    (dict(select_mode="online", select_ratio=1.5), "select_ratio"),
    (dict(select_mode="offline"), "select_scorer"),
    (dict(select_mode="online", select_reference="/no/such/dir"), "select_reference"),
    (dict(select_reference="/tmp"), "select_mode"),
    (dict(qat="int3"), "qat"),
    (dict(qat="int4", qat_group_size=48), "qat_group_size"),
])
def test_bad_selection_arguments_name_the_field(kw, field, tmp_path):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.build(None, dict(TINY, out_dir=str(tmp_path), max_steps=1, **kw))


def test_reference_with_another_tokenizer_is_refused(scorer_run, tmp_path):
    cfg = _cfg(tmp_path / "x", scorer_run["corpus"], max_steps=1, select_mode="online", tokenizer="bpe",
               vocab_size=300, select_reference=str(scorer_run["ref"]))
    with pytest.raises(ConfigError, match="select_reference.*another tokenizer"):
        train(cfg, log=lambda m: None)
