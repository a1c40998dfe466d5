"""pack_mode=document: the sampler ignores boundary targets, the windows split into documents, a train step runs
the varlen path; concat keeps the single stream."""
import numpy as np
import pytest
import torch
from trainer_helpers import small_corpus  # noqa: F401  (fixture)

from fmkernels.data import BatchSampler
from fmkernels.data.packing import document_cu_seqlens


def test_sampler_marks_boundary_targets_and_cu_seqlens():
    tokens = np.arange(1000) % 250 + 1
    starts = np.array([0, 10, 11, 400, 403, 900], dtype=np.int64)
    s = BatchSampler(tokens, 16, 8, seed=3, doc_starts=starts)
    plain = BatchSampler(tokens, 16, 8, seed=3)
    x, y = s.batch(5)
    x0, y0 = plain.batch(5)
    assert torch.equal(x, x0)  # inputs untouched, same windows
    ignored = y == -100
    assert torch.equal(y[~ignored], y0[~ignored])
    cu = document_cu_seqlens(y)
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 8 * 16 and bool((cu.diff() > 0).all())
    # every row start and every position after an ignored target starts a document
    expect = {r * 16 for r in range(8)} | {r * 16 + t + 1 for r, t in torch.nonzero(ignored).tolist() if t + 1 < 16}
    assert set(cu[:-1].tolist()) == expect


def test_sampler_boundaries_exact():
    tokens = np.arange(100)
    starts = np.array([0, 5, 9, 30], dtype=np.int64)
    s = BatchSampler(tokens, 8, 1, doc_starts=starts)
    for step in range(20):
        x, y = s.batch(step)
        o = int(x[0, 0])
        for t in range(8):
            assert (int(y[0, t]) == -100) == (o + t + 1 in starts.tolist())
            if int(y[0, t]) != -100:
                assert int(y[0, t]) == o + t + 1


@pytest.mark.parametrize("mode", ["document", "concat"])
def test_train_cli_pack_mode(tmp_path, small_corpus, capsys, mode, monkeypatch):
    import fmkernels.ops as ops
    from fmkernels.cli import main

    calls = []
    real = ops.flash_attention_varlen
    monkeypatch.setattr(ops, "flash_attention_varlen", lambda *a, **k: calls.append(1) or real(*a, **k))

    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--tokenizer", "byte", "--seq_len", "32", "--batch_size", "4", "--progress",
            "false", "--sample_tokens", "0", "--eval_every", "1000", "--log_every", "1", "--corpus", small_corpus,
            "--max_steps", "3", "--out_dir", out, "--pack_mode", mode]
    assert main([str(a) for a in args]) == 0, capsys.readouterr()
    assert (len(calls) > 0) == (mode == "document")  # document: every layer of every step runs varlen


def test_pack_mode_validated(capsys, tmp_path, small_corpus):
    from fmkernels.cli import main

    rc = main(["train", "--preset", "tiny", "--corpus", str(small_corpus), "--pack_mode", "bogus", "--out_dir",
               str(tmp_path / "r")])
    assert rc != 0 and "pack_mode" in capsys.readouterr().err
