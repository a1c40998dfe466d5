"""Checkpoints that are never lost (issue 21): signals and kills around a save, full and read-only disks, leftover
temporaries, set-aside copies, weights-only loading with fallback for `fmk eval` / `fmk generate`, SIGTERM during
the final evaluation."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from trainer_helpers import REPO, small_corpus  # noqa: F401  (fixture)

from fmkernels.data import ByteTokenizer
from fmkernels.train import checkpoint as ckpt


def _save(out, step, scale=1.0):
    torch.manual_seed(step)
    model = {"w": torch.randn(64, 64) * scale, "b": torch.full((64,), float(step))}
    return ckpt.save_checkpoint(out, step, model, {"state": {}, "param_groups": []}, {"step": step}, ByteTokenizer())


def _newest_complete(out):
    """(step, path) of the newest checkpoint that verifies, after the recovery a restart does."""
    ckpt.recover(out)
    ck = ckpt.load_latest(out, log=None)
    return (ck["state"]["step"], ck["path"]) if ck is not None else (None, None)


_CHILD = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from fmkernels.data import ByteTokenizer
from fmkernels.train import checkpoint as ckpt
torch.set_num_threads(1)
out, first = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGTERM, signal.SIG_DFL)
step = first
while True:
    for again in range(2):  # every step saved twice: the second save replaces a complete step directory
        model = {{"w": torch.randn(256, 256), "b": torch.full((256,), float(step))}}
        ckpt.save_checkpoint(out, step, model, {{"state": {{}}, "param_groups": []}}, {{"step": step}}, ByteTokenizer())
        print(step, flush=True)
    step += 1
"""


def test_two_signals_around_saves_never_lose_the_newest_checkpoint(tmp_path):
    """A writer saving in a loop gets two signals (SIGINT then SIGINT / SIGTERM / SIGKILL, 0-0.2 s apart) at
    random instants, again and again (each round restarts from the newest checkpoint); after every round the
    newest checkpoint reported complete is still there and verifies."""
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=REPO))
    rng = random.Random(21)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    first, rounds = 1, 6
    for r in range(rounds):
        p = subprocess.Popen([sys.executable, str(script), str(out), str(first)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip(), p.stderr.read()  # one save done: the loop is under way
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGINT)
        time.sleep(rng.uniform(0.0, 0.2))
        p.send_signal(rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL]))
        rest, err = p.communicate(timeout=180)  # generous: a loaded machine (the child exits within seconds)
        assert "CheckpointError" not in err and "Error" not in err.replace("KeyboardInterrupt", ""), err
        saved = [int(x) for x in rest.split()] or [first]
        step, path = _newest_complete(out)
        assert step is not None and step >= max(saved), (r, saved, step, sorted(os.listdir(ckpt.ckpt_root(out))))
        assert path.name == f"step_{step:08d}"
        assert not [n for n in os.listdir(ckpt.ckpt_root(out)) if n.startswith(".")]  # recover cleaned up
        first = step + 1


def test_kill_between_the_two_renames_keeps_a_copy(tmp_path, monkeypatch):
    """A kill after the old step directory was set aside and before the new one was renamed in: the aside copy is
    found by a read-only reader and renamed back by the next start."""
    out = tmp_path / "run"
    _save(out, 5)
    real_replace = os.replace

    def die_on_second(src, dst, calls=[]):
        calls.append(src)
        if len(calls) == 2:  # the first rename set step_5 aside; "kill" before the new one goes in
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        _save(out, 5, scale=2.0)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    root = ckpt.ckpt_root(out)
    assert not (root / "step_00000005").exists()
    cks = ckpt.list_checkpoints(out)
    assert len(cks) == 1 and cks[0].name.startswith(".old-step_00000005")
    ckpt.load_checkpoint(cks[0])  # complete and verified where it lies
    ckpt.recover(out)
    assert sorted(os.listdir(root)) == ["step_00000005"]


def test_leftover_temporaries_are_cleaned_and_do_not_block_the_next_save(tmp_path):
    out = tmp_path / "run"
    _save(out, 1)
    root = ckpt.ckpt_root(out)
    for junk in (".tmp-step_00000002-999", ".tmp-step_00000002-" + str(os.getpid()), ".drop-step_00000000-7"):
        (root / junk).mkdir()
        (root / junk / "model.safetensors").write_bytes(b"half")
    _save(out, 2)
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002"]


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_gives_one_clear_message_and_keeps_the_previous(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _save(out, 1)
    monkeypatch.setattr(ckpt.torch, "save", _enospc)
    with pytest.raises(ckpt.CheckpointError, match=r"no space left on the device") as ei:
        _save(out, 2)
    assert "step 2" in str(ei.value) and ei.value.__cause__ is None
    assert sorted(os.listdir(ckpt.ckpt_root(out))) == ["step_00000001"]  # temporary removed
    monkeypatch.undo()
    assert _newest_complete(out)[0] == 1


def test_read_only_directory_gives_one_clear_message(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def erofs(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(ckpt.Path, "mkdir", erofs)
    with pytest.raises(ckpt.CheckpointError, match=r"read-only file system \(choose a writable out_dir\)"):
        _save(out, 1)


def test_read_only_out_dir_in_the_cli_is_one_line(tmp_path, small_corpus, monkeypatch, capsys):
    from fmkernels.cli import main

    def erofs(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", erofs)
    rc = main(["train", "--preset", "tiny", "--tokenizer", "byte", "--corpus", str(small_corpus), "--max_steps", "2",
               "--progress", "false", "--out_dir", str(tmp_path / "ro")])
    err = capsys.readouterr().err
    assert rc == 2 and "read-only file system" in err and "Traceback" not in err


def test_weights_only_loading_falls_back_like_resume(tmp_path):
    out = tmp_path / "run"
    _save(out, 1)
    _save(out, 2)
    newest = ckpt.list_checkpoints(out)[-1]
    # an optimizer state eval does not need: weights-only loading still uses the newest
    o = newest / "optimizer.pt"
    o.write_bytes(o.read_bytes()[:10])
    ck = ckpt.load_weights(out)
    assert ck["state"]["step"] == 2 and ck["optimizer"] is None and ck["rng"] is None
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        ckpt.load_checkpoint(newest)
    # corrupt weights: the previous checkpoint, with a warning naming the file
    w = newest / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[len(b) // 2] ^= 0xFF
    w.write_bytes(bytes(b))
    logs = []
    with pytest.warns(RuntimeWarning, match="falling back"):
        ck = ckpt.load_weights(out, log=logs.append)
    assert ck["state"]["step"] == 1 and "model.safetensors" in logs[0]


def test_fmk_eval_and_generate_fall_back_on_a_corrupt_newest(tmp_path, small_corpus, capsys):
    from fmkernels.cli import main

    out = tmp_path / "run"
    common = ["--preset", "tiny", "--tokenizer", "byte", "--seq_len", "32", "--batch_size", "4", "--progress", "false",
              "--sample_tokens", "0", "--final_eval", "false", "--corpus", str(small_corpus), "--out_dir", str(out)]
    assert main(["train", *common, "--max_steps", "4", "--save_every", "2"]) == 0
    newest = ckpt.list_checkpoints(out)[-1]
    w = newest / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="falling back"):
        rc = main(["eval", "--checkpoint", str(out), "--max_tokens", "64", "--json"])
    o = capsys.readouterr()
    assert rc == 0 and json.loads(o.out)["step"] == 2 and "falling back" in o.err
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max_new_tokens", "4"]) == 0
    # the corrupt checkpoint named directly: one clear line, no traceback
    rc = main(["generate", "--checkpoint", str(newest), "--prompt", "x", "--max_new_tokens", "2"])
    assert rc == 2 and "model.safetensors" in capsys.readouterr().err


def test_sigterm_during_the_final_evaluation_is_honoured(tmp_path, small_corpus):
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--tokenizer", "byte", "--seq_len", "32", "--batch_size", "4", "--progress", "false",
            "--sample_tokens", "0", "--eval_every", "1000", "--corpus", str(small_corpus), "--out_dir", str(out),
            "--max_steps", "2", "--eval_tokens", "64", "--val_fraction", "0.5"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.Popen([sys.executable, "-m", "fmkernels.cli", "train", *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.list_checkpoints(out):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)  # the final save is done: the full-split evaluation is running (or next)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 143, text
    assert "Traceback" not in text
    assert ckpt.list_checkpoints(out)[-1].name == "step_00000002"
