"""A run directory that holds a run is never deleted (issue 15, bug 3)."""
import hashlib

import pytest
from trainer_helpers import small_corpus  # noqa: F401  (fixture)

from fmkernels.models.config import ConfigError
from fmkernels.train import TrainConfig, train
from fmkernels.train.rundir import choose_out_dir, free_sibling, holds_run

TINY = dict(preset="tiny", tokenizer="byte", seq_len=32, batch_size=4, progress=False, sample_tokens=0,
            eval_every=1000, log_every=1, final_eval=False, warmup_steps=0, dtype="fp32", max_steps=2)


def _digest(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_second_default_run_keeps_the_first(tmp_path, monkeypatch, small_corpus):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.build(None, dict(TINY, corpus=str(small_corpus)))
    assert cfg.out_dir == TrainConfig.out_dir == "runs/default"
    s1 = train(cfg, log=lambda m: None)
    first = tmp_path / "runs" / "default"
    before = _digest(first)
    assert any(k.startswith("checkpoints/") for k in before)
    logs = []
    s2 = train(TrainConfig.build(None, dict(TINY, corpus=str(small_corpus))), log=logs.append)
    assert _digest(first) == before  # not a byte changed
    assert s2["checkpoint"].startswith("runs/default-2/") and s1["checkpoint"].startswith("runs/default/")
    assert any("runs/default-2" in m and "kept" in m for m in logs)
    s3 = train(TrainConfig.build(None, dict(TINY, corpus=str(small_corpus))), log=lambda m: None)
    assert s3["checkpoint"].startswith("runs/default-3/")
    assert _digest(first) == before
    # --resume of the default continues runs/default itself (a finished run: nothing to do)
    assert choose_out_dir("runs/default", "runs/default", resume=True) == ("runs/default", None)


def test_explicit_out_dir_with_a_run_is_refused(tmp_path, small_corpus):
    out = tmp_path / "mine"
    train(TrainConfig.build(None, dict(TINY, corpus=str(small_corpus), out_dir=str(out))), log=lambda m: None)
    before = _digest(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig.build(None, dict(TINY, corpus=str(small_corpus), out_dir=str(out))), log=lambda m: None)
    assert _digest(out) == before


def test_free_sibling(tmp_path):
    d = tmp_path / "r"
    assert free_sibling(d) == d and not holds_run(d)
    d.mkdir()
    (d / "notes.txt").write_text("a user's file is not a run")
    assert free_sibling(d) == d
    (d / "metrics.csv").write_text("step\n")
    assert free_sibling(d) == tmp_path / "r-2"
    (tmp_path / "r-2" / "checkpoints").mkdir(parents=True)
    assert free_sibling(d) == tmp_path / "r-3"
