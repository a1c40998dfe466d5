"""The fmk command behaves like a well-kept tool (issue 15 items 8-12, 14): OMP_WAIT_POLICY set before torch
loads, progress lines instead of a bar when redirected, one error style, resume of a finished run, the settings
a fine-tune records, subset vs full-split evaluations, readable benchmark plots."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest
from trainer_helpers import REPO, fmk, small_corpus  # noqa: F401  (fixture)

PY = sys.executable
TINY = ["--preset", "tiny", "--tokenizer", "byte", "--seq_len", "32", "--batch_size", "4", "--sample_tokens", "0",
        "--warmup_steps", "0", "--dtype", "fp32"]


# ---------------------------------------------------------------- 8: OMP_WAIT_POLICY
def _env_without_omp():
    e = dict(os.environ)
    e.pop("OMP_WAIT_POLICY", None)
    return e


def test_fmk_sets_omp_wait_policy_before_torch(tmp_path):
    probe = ("import sys, os; import fmkernels.cli as c; "
             "print('OMP', os.environ.get('OMP_WAIT_POLICY'))")
    # as `python -m fmkernels.cli` (the value reaches `fmk info`)
    r = subprocess.run([PY, "-m", "fmkernels.cli", "info", "--json"], capture_output=True, text=True, cwd=REPO,
                       env=_env_without_omp(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["omp_wait_policy"] == "PASSIVE"
    # as the console script (a file named fmk): set before torch is imported
    script = tmp_path / "fmk"
    script.write_text("import sys\nimport fmkernels\nfrom fmkernels import _cli_env\n"
                      "print('OMP', __import__('os').environ.get('OMP_WAIT_POLICY'))\n")
    r = subprocess.run([PY, str(script)], capture_output=True, text=True, cwd=REPO,
                       env=dict(_env_without_omp(), PYTHONPATH=REPO), timeout=300)
    assert "OMP PASSIVE" in r.stdout, r.stderr
    # a user's own setting wins; a library import changes nothing
    r = subprocess.run([PY, "-m", "fmkernels.cli", "info", "--json"], capture_output=True, text=True, cwd=REPO,
                       env=dict(_env_without_omp(), OMP_WAIT_POLICY="ACTIVE"), timeout=300)
    assert json.loads(r.stdout)["omp_wait_policy"] == "ACTIVE"
    r = subprocess.run([PY, "-c", probe.replace("fmkernels.cli as c", "fmkernels")], capture_output=True, text=True,
                       cwd=REPO, env=_env_without_omp(), timeout=300)
    assert "OMP None" in r.stdout, r.stderr


def test_is_fmk_command():
    from fmkernels._cli_env import is_fmk_command

    assert is_fmk_command(["/v/bin/python", "/v/bin/fmk", "train"])
    assert is_fmk_command(["python", "-m", "fmkernels.cli", "eval"])
    assert not is_fmk_command(["python", "train.py"]) and not is_fmk_command(["python", "-m", "pytest"])


# ---------------------------------------------------------------- 9: progress when redirected
def test_line_progress_one_line_per_interval():
    from fmkernels.train.progress import LineProgress, progress_bar

    t = [0.0]
    buf = io.StringIO()
    p = LineProgress(100, 0, "step", file=buf, interval_s=10, clock=lambda: t[0])
    for _ in range(100):
        t[0] += 1.0
        p.update(1)
        p.set_postfix(loss="1.0")
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 + 1 and "\r" not in buf.getvalue()  # one per 10 s + the final line
    assert lines[-1].startswith("progress: step 100/100 (100%)") and "loss=1.0" in lines[-1]
    assert isinstance(progress_bar(10, file=io.StringIO()), LineProgress)  # not a terminal: no tqdm


def test_redirected_train_writes_little(tmp_path, small_corpus):
    """A 60-step run with stdout and stderr redirected to a file: no carriage returns, under 5 KB in all."""
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        r = subprocess.run([PY, "-m", "fmkernels.cli", "train", *TINY, "--max_steps", "60", "--corpus",
                            str(small_corpus), "--out_dir", str(tmp_path / "run"), "--eval_every", "20",
                            "--eval_tokens", "2048"], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                           env=dict(os.environ, FMK_PROGRESS_INTERVAL_S="1"), timeout=600)
    data = log.read_bytes()
    assert r.returncode == 0, data[-2000:]
    assert b"\r" not in data and len(data) < 5 * 1024, (len(data), data[:3000])
    assert b"progress: step 60/60 (100%)" in data


# ---------------------------------------------------------------- 10: one error style
@pytest.mark.parametrize("args", [
    ["eval", "--checkpoint", "/nonexistent/run"],
    ["generate", "--checkpoint", "/nonexistent/run"],
    ["merge", "--checkpoint", "/nonexistent/run", "--out_dir", "/tmp/fmk-never"],
    ["prune", "--checkpoint", "/nonexistent/run", "--out_dir", "/tmp/fmk-never"],
    ["quantize", "--checkpoint", "/nonexistent/run", "--out_dir", "/tmp/fmk-never"],
    ["finetune", "--from", "/nonexistent/run", "--out_dir", "/tmp/fmk-never", "--max_steps", "1"],
    ["train", "--corpus", "/nonexistent/corpus", "--out_dir", "/tmp/fmk-never"],
    ["train", "--preset", "nope", "--out_dir", "/tmp/fmk-never"],
])
def test_bad_input_is_a_message_and_rc_2(args, capsys):
    from fmkernels.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fmk {args[0]}: ") and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_bench_outside_a_checkout_writes_nothing(tmp_path, monkeypatch, capsys):
    """fmk bench from an installed copy (no benchmarks/ beside the package or in the cwd): message, rc 2, and no
    empty bench-results/."""
    import fmkernels.bench as bench
    from fmkernels.cli import main

    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site" / "fmkernels" / "bench.py"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--out_dir", "res"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmk bench: benchmarks/ not found") and "Traceback" not in err
    assert not (tmp_path / "res").exists()


def test_bench_without_dev_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    from fmkernels.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pytest_benchmark" else real(n, *a))
    monkeypatch.chdir(REPO)
    assert main(["bench", "--out_dir", str(tmp_path / "res")]) == 2
    assert "pytest_benchmark" in capsys.readouterr().err and not (tmp_path / "res").exists()


# ---------------------------------------------------------------- 11: resume of a finished run
def test_resume_finished_run_says_so(tmp_path, small_corpus):
    out = tmp_path / "run"
    base = [*TINY, "--max_steps", "4", "--corpus", str(small_corpus), "--out_dir", str(out), "--eval_every", "2",
            "--eval_tokens", "1024"]
    assert fmk("train", *base).returncode == 0
    metrics = (out / "metrics.csv").read_text()
    summary = (out / "summary.json").read_text()
    r = fmk("train", *base, "--resume")
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stdout + r.stderr
    assert (out / "metrics.csv").read_text() == metrics and (out / "summary.json").read_text() == summary
    assert "NaN" not in (out / "summary.json").read_text()
    # raising max_steps continues it
    r = fmk("train", *[a if a != "4" else "6" for a in base], "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["step"] == 6


# ---------------------------------------------------------------- 12: settings recorded; subset vs full evals
def test_finetune_records_real_settings_and_eval_sets(tmp_path, small_corpus):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert fmk("train", *TINY, "--max_steps", "2", "--corpus", str(small_corpus), "--out_dir", str(pre),
               "--final_eval", "false").returncode == 0
    # fine-tune with none of the model flags: TrainConfig's defaults are preset small + bpe
    r = fmk("finetune", "--from", str(pre), "--max_steps", "4", "--corpus", str(small_corpus), "--out_dir", str(ft),
            "--seq_len", "32", "--batch_size", "4", "--sample_tokens", "0", "--eval_every", "2",
            "--eval_tokens", "1024", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    from fmkernels.train import checkpoint as ckpt

    st = ckpt.load_checkpoint(ckpt.list_checkpoints(ft)[-1])["state"]
    assert st["config"]["preset"] == "tiny" and st["config"]["tokenizer"] == "byte"
    assert st["config"]["dim"] == st["model_config"]["dim"]
    log = (ft / "train.log").read_text()
    assert "preset=tiny" in log and "preset=small" not in log
    with open(ft / "metrics.csv", newline="") as f:
        sets = [r["val_set"] for r in csv.DictReader(f) if r["val_loss"]]
    assert sets == ["first 1024 tokens", "full"]
    assert "best periodic validation bits per byte (first 1,024 tokens)" in log
    assert (ft / "loss_curve.png").exists()


def test_plot_separates_subset_and_full(tmp_path):
    pytest.importorskip("matplotlib")
    from fmkernels.train.plots import plot_run

    rows = [dict(step=1, tokens=100, loss="3.0"), dict(step=2, tokens=200, val_loss="2.9", val_set="first 10 tokens"),
            dict(step=3, tokens=300, loss="2.5"), dict(step=3, tokens=300, val_loss="2.7", val_set="full")]
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "tokens", "loss", "val_loss", "val_set"])
        w.writeheader()
        w.writerows(rows)
    import matplotlib.pyplot as plt

    captured = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        captured["lines"] = {l.get_label(): len(l.get_xdata()) for ax in fig.axes for l in ax.get_lines()}
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        assert plot_run(tmp_path, "t").exists()
    finally:
        plt.Figure.savefig = real_savefig
    assert captured["lines"] == {"train loss": 2, "validation loss (first 10 tokens)": 1,
                                 "validation loss (full split)": 1}
    # multitask: per-task training losses from tasks.csv; the classification loss on its own axis, the combined
    # objective (metrics.csv "loss") not drawn as a language-model loss
    with open(tmp_path / "tasks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "kind", "task", "train_loss"])
        w.writeheader()
        w.writerows([dict(step=1, kind="train", task="lm", train_loss="3.1"),
                     dict(step=1, kind="train", task="pkg", train_loss="2.0"),
                     dict(step=3, kind="train", task="lm", train_loss="2.6"),
                     dict(step=3, kind="train", task="pkg", train_loss="1.5")])
    plt.Figure.savefig = spy
    try:
        plot_run(tmp_path, "t")
    finally:
        plt.Figure.savefig = real_savefig
    assert captured["lines"] == {"train loss (lm)": 2, "train loss (pkg)": 2, "validation loss (first 10 tokens)": 1,
                                 "validation loss (full split)": 1}


# ---------------------------------------------------------------- 14: benchmark plots
def test_bench_png_readable(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from fmkernels.bench import KIND_COLORS, bar_kind, bar_text, write_report

    def bench(label, ms, peer=False):
        return {"name": label, "group": "rms_norm 4096x4096", "stats": {"median": ms / 1e3},
                "extra_info": {"label": label, "peer": peer, "bytes": 64e6}}

    data = {"benchmarks": [bench("torch F.rms_norm", 20.0, peer=True), bench("fmk-cpu", 5.0),
                           bench("fmk-reference", 40.0)]}
    write_report(data, tmp_path)
    (png,) = tmp_path.glob("*.png")
    h, w = mpimg.imread(png).shape[:2]
    assert w >= 900 and h >= 200, (w, h)
    rows = {b["extra_info"]["label"]: dict(label=b["extra_info"]["label"], peer=b["extra_info"]["peer"])
            for b in data["benchmarks"]}
    kinds = {k: bar_kind(r) for k, r in rows.items()}
    assert kinds == {"torch F.rms_norm": "PyTorch peer", "fmk-cpu": "fmkernels CPU",
                     "fmk-reference": "fmkernels reference"}
    assert len({KIND_COLORS[k] for k in kinds.values()}) == 3  # reference no longer coloured like the fast path
    assert bar_text(dict(ms=5.0, speedup_vs_peer=4.0, throughput=12.8, unit="GB/s")) == "5 ms, 12.8 GB/s, 4.00x vs peer"
