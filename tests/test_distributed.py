"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 (fully_shard) train the tiny model, and a DDP run
resumes from its checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from trainer_helpers import REPO, small_corpus  # noqa: F401  (fixture)

from fmkernels.testing import free_port

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _torchrun(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "fmkernels.cli", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_training(tmp_path, small_corpus, mode):
    out = tmp_path / mode
    args = ["--preset", "tiny", "--tokenizer", "byte", "--corpus", small_corpus, "--seq_len", 32, "--batch_size", 4,
            "--max_steps", 8, "--save_every", 4, "--eval_every", 4, "--eval_tokens", 2048, "--progress", "false",
            "--sample_tokens", 0, "--distributed", mode, "--out_dir", out, "--threads", 1]
    r = _torchrun(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 8 and s["tokens"] == 8 * 4 * 32 * 2
    assert s["final_train_loss"] < 5.5 and s["val_bpb"] > 0
    assert f"world 2 ({mode})" in (out / "train.log").read_text()
    if mode == "ddp":
        return  # DDP checkpoints use the single-process state-dict path (the kill-and-resume test covers it)
    r = _torchrun([*args, "--max_steps", 10, "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["step"] == 10
    assert "resumed from" in (out / "train.log").read_text()
