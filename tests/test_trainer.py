"""The trainer end to end on CPU with tiny models: CLI spellings, exact kill-and-resume, signals, corrupted
checkpoints, non-finite steps, config errors, eval / generate, data determinism."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from trainer_helpers import REPO, fmk, small_corpus, stdlib_bytes  # noqa: F401  (fixtures)

from fmkernels.data import (BatchSampler, BPETokenizer, ByteTokenizer, CorpusError, load_tokenizer, prepare_data,
                            split_documents, stdlib_files, user_documents)
from fmkernels.models.config import ConfigError
from fmkernels.train import TrainConfig, lr_at
from fmkernels.train import checkpoint as ckpt

TINY = ["--preset", "tiny", "--tokenizer", "byte", "--seq_len", "32", "--batch_size", "4", "--progress", "false",
        "--sample_tokens", "0", "--eval_every", "1000", "--log_every", "1"]


def cli(capsys, *args):
    """`fmk ...` in this process (no interpreter start-up): (exit code, stdout + stderr)."""
    from fmkernels.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    o = capsys.readouterr()
    return rc, o.out + o.err


def _summary(d):
    return json.loads((d / "summary.json").read_text())


def test_train_cli_spelling_and_outputs(tmp_path, small_corpus, capsys):
    out = tmp_path / "run"
    rc, text = cli(capsys, "train", *TINY, "--corpus", small_corpus, "--max_steps", 12, "--out_dir", out,
                   "--eval_every", 6, "--sample_tokens", 20)
    assert rc == 0, text
    s = _summary(out)
    assert s["step"] == 12 and s["stop_reason"] == "max_steps" and np.isfinite(s["val_bpb"])
    assert (out / "loss_curve.png").stat().st_size > 1000
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 13
    assert "bits per byte" in text and "--- sample ---" in text
    cks = ckpt.list_checkpoints(out)
    assert cks and cks[-1].name == "step_00000012"
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "state.json", "MANIFEST.json"} <= {p.name for p in cks[-1].iterdir()}
    # eval and generate from the checkpoint
    rc, text = cli(capsys, "eval", "--checkpoint", out, "--json")
    assert rc == 0, text
    ev = json.loads(text)
    assert abs(ev["val_bpb"] - s["val_bpb"]) < 1e-3
    rc, text = cli(capsys, "generate", "--checkpoint", out, "--prompt", "import ", "--max_new_tokens", 10)
    assert rc == 0 and text.startswith("import "), text


def test_kill_and_resume_is_bit_identical(tmp_path, small_corpus):
    """N steps straight == k steps, SIGKILL, --resume to N (CPU, fixed seed, deterministic kernels)."""
    args = [*TINY, "--corpus", small_corpus, "--max_steps", 40, "--save_every", 5, "--final_eval", "false"]
    straight = tmp_path / "straight"
    r = fmk("train", *args, "--out_dir", straight)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.Popen([sys.executable, "-m", "fmkernels.cli", "train", *map(str, args), "--out_dir", str(killed)],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step_00000015").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps = [c.name for c in ckpt.list_checkpoints(killed)]
    assert steps and steps[-1] < "step_00000040", "the run finished before it could be killed"
    r = fmk("train", *args, "--out_dir", killed, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout + r.stderr
    a, b = _summary(straight), _summary(killed)
    assert b["step"] == 40 and a["final_train_loss"] == b["final_train_loss"]
    wa = ckpt.load_checkpoint(ckpt.resolve_checkpoint(straight))["model"]
    wb = ckpt.load_checkpoint(ckpt.resolve_checkpoint(killed))["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the CSV was truncated to the checkpoint and continued: one row per step
    steps_logged = [int(l.split(",")[0]) for l in (killed / "metrics.csv").read_text().splitlines()[1:]]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 40


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_exits(tmp_path, small_corpus, sig, code):
    out = tmp_path / "run"
    args = [*TINY, "--corpus", small_corpus, "--max_steps", 100000, "--save_every", 100000, "--out_dir", out]
    p = subprocess.Popen([sys.executable, "-m", "fmkernels.cli", "train", *map(str, args)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) > 3):
        time.sleep(0.05)
    p.send_signal(sig)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == code, text
    assert "checkpoint saved" in text and "Traceback" not in text
    assert ckpt.list_checkpoints(out)


def test_resume_names_a_changed_architecture_switch(tmp_path, small_corpus, capsys):
    """A run started with --qk_norm false (the default before 2026-12-07) resumed without it: a ConfigError naming
    qk_norm, not a state_dict key error; with the switch it resumes."""
    out = tmp_path / "run"
    args = [*TINY, "--corpus", small_corpus, "--save_every", 2, "--final_eval", "false", "--out_dir", out]
    assert cli(capsys, "train", *args, "--max_steps", 2, "--qk_norm", "false")[0] == 0
    rc, text = cli(capsys, "train", *args, "--max_steps", 4, "--resume")
    assert rc != 0 and "qk_norm True here, False in the checkpoint" in text, text
    rc, text = cli(capsys, "train", *args, "--max_steps", 4, "--resume", "--qk_norm", "false")
    assert rc == 0 and "resumed from" in text, text


def test_corrupted_checkpoint_falls_back(tmp_path, small_corpus, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--corpus", small_corpus, "--save_every", 4, "--final_eval", "false", "--out_dir", out]
    assert cli(capsys, "train", *args, "--max_steps", 8)[0] == 0
    cks = ckpt.list_checkpoints(out)
    assert [c.name for c in cks] == ["step_00000004", "step_00000008"]
    w = cks[-1] / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncate
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors is truncated"):
        ckpt.load_checkpoint(cks[-1])
    with pytest.warns(RuntimeWarning, match="falling back"):
        rc, text = cli(capsys, "train", *args, "--max_steps", 10, "--resume")
    assert rc == 0, text
    assert "model.safetensors" in text and "falling back" in text and "resumed from" in text and "step_00000004" in text
    # corrupt bytes, same size
    ck = ckpt.list_checkpoints(out)[-1]
    o = ck / "optimizer.pt"
    b = bytearray(o.read_bytes())
    b[len(b) // 2] ^= 0xFF
    o.write_bytes(bytes(b))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.pt is corrupted"):
        ckpt.load_checkpoint(ck)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, small_corpus, capsys):
    out = tmp_path / "run"
    rc, text = cli(capsys, "train", *TINY, "--corpus", small_corpus, "--max_steps", 50, "--lr", "1e30",
                   "--warmup_steps", 0, "--grad_clip", 0, "--max_nonfinite", 3, "--out_dir", out)
    assert rc == 3, text
    assert "update skipped" in text and "3 non-finite steps in a row" in text
    assert _summary(out)["stop_reason"] == "non-finite"


class TestBadConfig:
    def test_unknown_key(self, tmp_path, capsys):
        rc, text = cli(capsys, "train", "--config", _yaml(tmp_path, "lr: 0.1\nlearning_rat: 3\n"))
        assert rc == 2 and "unknown field(s) learning_rat" in text

    def test_unknown_flag(self, capsys):
        with pytest.raises(SystemExit):
            cli(capsys, "train", "--learning_rat", "3")

    def test_heads_not_dividing(self, capsys):
        rc, text = cli(capsys, "train", "--preset", "tiny", "--n_heads", "5", "--max_steps", "1")
        assert rc == 2 and "n_heads (5) must divide dim (64)" in text

    def test_missing_corpus(self, capsys):
        rc, text = cli(capsys, "train", "--corpus", "/nonexistent/path", "--max_steps", "1")
        assert rc == 2 and "corpus" in text and "does not exist" in text

    def test_bad_type(self):
        with pytest.raises(ConfigError, match="batch_size must be int"):
            TrainConfig.build(overrides={"batch_size": "many"})

    def test_keep_last(self):
        with pytest.raises(ConfigError, match="keep_last must be >= 2"):
            TrainConfig.build(overrides={"keep_last": 1})

    def test_empty_corpus(self, tmp_path, capsys):
        d = tmp_path / "empty"
        d.mkdir()
        (d / "a.txt").write_text("")
        rc, text = cli(capsys, "train", "--preset", "tiny", "--corpus", d, "--max_steps", 1, "--out_dir", tmp_path / "o")
        assert rc == 2 and "corpus" in text and "contains no text" in text

    def test_yaml_and_override_precedence(self, tmp_path):
        cfg = TrainConfig.build(_yaml(tmp_path, "lr: 0.1\npreset: tiny\n"), {"lr": "0.5"})
        assert cfg.lr == 0.5 and cfg.preset == "tiny"

    def test_max_time_applies_only_without_max_steps(self):
        assert TrainConfig.build().max_time_s == 300.0
        assert TrainConfig.build(overrides={"max_steps": "50"}).max_time_s is None


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=100, lr_schedule="cosine")
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 0.09) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)


class TestData:
    def test_stdlib_policy(self):
        files = stdlib_files()
        rels = [r for r, _ in files]
        assert rels == sorted(rels) and len(rels) > 300
        assert not any("site-packages" in r or r.split("/")[-1].startswith("_sysconfigdata_") for r in rels)
        assert not any(set(r.split("/")[:-1]) & {"test", "tests", "idle_test"} for r in rels)
        with_tests = stdlib_files(include_tests=True)
        assert len(with_tests) > len(files)

    def test_user_corpora_and_split(self, tmp_path):
        (tmp_path / "a.txt").write_text("hello world " * 50000)
        docs, h1 = user_documents(tmp_path / "a.txt")
        assert len(docs) > 1 and user_documents(tmp_path / "a.txt")[1] == h1
        jl = tmp_path / "b.jsonl"
        jl.write_text("\n".join(json.dumps({"text": f"doc {i}", "id": i}) for i in range(100)))
        docs, _ = user_documents(jl)
        train, val = split_documents(docs, 0.1)
        assert len(train) + len(val) == 100 and 0 < len(val) < 30
        with pytest.raises(CorpusError, match="no text field 'body'"):
            user_documents(jl, text_field="body")
        bad = tmp_path / "c.jsonl"
        bad.write_bytes(b'{"text": "x"}\n{not json\n')
        with pytest.raises(CorpusError, match="line 2 is not valid JSON"):
            user_documents(bad)

    def test_cache_is_reused_and_memmapped(self, tmp_path, small_corpus):
        logs = []
        d1 = prepare_data(str(small_corpus), "byte", log=logs.append)
        assert any("tokenizing" in m for m in logs) and isinstance(d1.train, np.memmap)
        assert d1.train.dtype == np.uint16
        logs.clear()
        d2 = prepare_data(str(small_corpus), "byte", log=logs.append)
        assert not logs and np.array_equal(d1.train, d2.train) and d1.corpus_hash == d2.corpus_hash
        assert (small_corpus / ".fmk-cache").is_dir()

    def test_bpe_tokenizer_round_trip(self, tmp_path):
        texts = ["def foo(x):\n    return x + 1\n", "class Bar:\n    pass\n"] * 200
        tok = BPETokenizer.train(texts, 300)
        s = "def bar(y):\n    return y * 2  # é\n"
        assert tok.decode(tok.encode(s)) == s
        tb = tok.token_bytes()
        assert tb[tok.encode(s)].sum() == len(s.encode("utf-8"))
        tok.save(tmp_path / "t")
        tok2 = load_tokenizer(tmp_path / "t")
        assert tok2.encode(s) == tok.encode(s)
        b = ByteTokenizer()
        assert b.decode(b.encode(s)) == s

    def test_sampler_is_stateless_and_sharded(self, stdlib_bytes):
        s = BatchSampler(stdlib_bytes, 16, 4, seed=3)
        x1, y1 = s.batch(7, 0)
        x2, _ = s.batch(7, 0)
        assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
        r0, r1 = BatchSampler(stdlib_bytes, 16, 4, 3, 0, 2), BatchSampler(stdlib_bytes, 16, 4, 3, 1, 2)
        assert r0.hi <= r1.lo + 1


def test_int8_training_and_sparsity_switches(tmp_path, small_corpus, capsys):
    import fmkernels as fk

    try:
        fk.Int8TrainingConfig
    except AttributeError:
        pytest.skip("this build has no Int8TrainingConfig")
    out = tmp_path / "int8"
    rc, text = cli(capsys, "train", *TINY, "--corpus", small_corpus, "--max_steps", 3, "--out_dir", out,
                   "--int8_training", "true", "--final_eval", "false")
    assert rc == 0, text
    assert np.isfinite(_summary(out)["final_train_loss"])
    try:
        fk.sparsify_
    except AttributeError:
        rc, text = cli(capsys, "train", *TINY, "--corpus", small_corpus, "--max_steps", 1, "--sparsity", "2:4",
                       "--out_dir", tmp_path / "sp")
        assert rc == 2 and "sparsity" in text


def test_tensorboard_logging(tmp_path, small_corpus, capsys):
    """--tensorboard true writes event files with the training and validation scalars of metrics.csv."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (make test installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rc, text = cli(capsys, "train", *TINY, "--corpus", small_corpus, "--max_steps", 6, "--out_dir", out,
                   "--eval_every", 3, "--tensorboard", "true", "--sample_tokens", 0)
    assert rc == 0, text
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "val_loss", "val_bpb"} <= tags, tags
    import csv
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["loss"] != ""]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows] and len(loss) >= 6
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
