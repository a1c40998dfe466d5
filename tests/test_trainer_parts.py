"""The loop's helpers that live beside their kind (issue 16: trainer.py holds the loop and its plumbing only)."""
import io
import math
import signal
from types import SimpleNamespace

import torch

from fmkernels.train.generate import run_sample
from fmkernels.train.metrics import Metrics, eval_scope, evaluate_data
from fmkernels.train.optim import lr_at, schedule_progress, set_lr
from fmkernels.train.parallel import DistInfo, all_finite, count_params
from fmkernels.train.progress import LineProgress, run_progress
from fmkernels.train.signals import EXIT_SIGINT, EXIT_SIGTERM, StopSignals, exit_code_for


def _cfg(**kw):
    base = dict(max_steps=100, max_time_s=None, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_schedule_progress_follows_steps_or_the_time_budget():
    assert schedule_progress(_cfg(), 25, 999.0) == 0.25
    assert schedule_progress(_cfg(max_time_s=100.0), 25, 50.0) == 0.5  # the time budget is further along
    assert schedule_progress(_cfg(max_time_s=100.0), 75, 50.0) == 0.75
    cfg = _cfg()
    assert lr_at(cfg, 100, schedule_progress(cfg, 100, 0.0)) == cfg.lr * cfg.min_lr_ratio


def test_set_lr_applies_each_groups_scale():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": 0.5}, {"params": [q]}], lr=1.0)
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]


def test_eval_scope_and_rows(tmp_path):
    assert eval_scope(None, 1000) == "full split"
    assert eval_scope(5000, 1000) == "full split"
    assert eval_scope(100, 1000) == "first 100 tokens"
    m = Metrics(tmp_path, True)
    m.train_row(3, 1.5, 300, 2.25, 1e-3, 0.5, 200.0, 1e9)
    m.eval_row(3, 1.5, 300, 2.0, 1.1, 1e9, 100, False)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[1].startswith("3,1.500,300,2.25,0.001,0.5,200.0,,,1e+09,")
    assert rows[2].endswith(",2.000000,1.100000,1e+09,first 100 tokens")


def test_evaluate_data_prefers_the_datas_own_evaluation():
    own = SimpleNamespace(evaluate=lambda model, bs, mt, ac: {"loss": 1.0, "bpb": 2.0, "bs": bs, "mt": mt})
    assert evaluate_data(None, own, 4, 16, "cpu", None, 7) == {"loss": 1.0, "bpb": 2.0, "bs": 4, "mt": 7}


def test_all_finite_and_count_params():
    assert all_finite(1.0, 2.0, 1)
    assert not all_finite(math.nan, 2.0, 1)
    assert not all_finite(1.0, math.inf, 1)
    model = torch.nn.Linear(3, 2)
    info = DistInfo(mode="none", rank=0, local_rank=0, world=1)
    assert count_params(model, info, None) == 8


def test_signal_exit_codes_and_agreement():
    assert exit_code_for(signal.SIGINT) == EXIT_SIGINT and exit_code_for(signal.SIGTERM) == EXIT_SIGTERM
    s = StopSignals()
    assert s.agreed(1, None) is None
    s.received = signal.SIGTERM
    assert s.agreed(1, None) == signal.SIGTERM
    assert s.agreed(2, lambda v, world: max(v, float(signal.SIGINT))) == max(signal.SIGTERM, signal.SIGINT)


def test_run_progress_counts_steps_or_seconds(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: plain lines
    bar = run_progress(_cfg(), 10, 0.0)
    assert isinstance(bar, LineProgress) and (bar.total, bar.n, bar.unit) == (100, 10, "step")
    bar = run_progress(_cfg(max_time_s=300.0), 10, 12.4)
    assert (bar.total, bar.n, bar.unit) == (300, 12, "s")


def test_run_sample_only_for_our_model():
    cfg = SimpleNamespace(sample_tokens=0, model_impl="fmkernels")
    assert run_sample(object(), None, cfg) is None
    cfg = SimpleNamespace(sample_tokens=5, model_impl="plain")
    assert run_sample(object(), None, cfg) is None
    assert run_sample(None, None, SimpleNamespace(sample_tokens=5, model_impl="fmkernels")) is None
