"""Task heads and multitask learning (fmkernels/train/{heads,multitask}.py): each test fails if its switch silently
did nothing. Tiny models, byte tokenizer, a synthetic three-package corpus, a few steps."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from fmkernels.data.corpus import is_validation
from fmkernels.data.tasks import package_of, package_split, text_chunks, token_chunks
from fmkernels.models.config import ConfigError
from fmkernels.train import TrainConfig, train
from fmkernels.train.heads import ClassificationHead, TaskHeads, pool
from fmkernels.train.multitask import parse_weights, sampling_probs
from fmkernels.train.parallel import unwrap
from fmkernels.train.trainer import Trainer

TINY = dict(preset="tiny", tokenizer="byte", seq_len=32, batch_size=8, progress=False, sample_tokens=0,
            eval_every=1000, log_every=1, warmup_steps=0, lr=1e-2, weight_decay=0.0, dtype="fp32", val_fraction=0.25,
            cls_classes=3)

WORDS = {  # each package writes code with its own identifiers: a learnable label
    "alpha": ["socket", "connect", "send", "recv", "port", "host", "close", "buffer"],
    "beta": ["matrix", "row", "col", "scale", "dot", "norm", "vector", "solve"],
    "gamma": ["token", "lexer", "parse", "grammar", "rule", "node", "visit", "emit"],
}


def _code(rng, words, n_funcs=40) -> str:
    out = []
    for _ in range(n_funcs):
        a, b, c = rng.choice(words, 3)
        out.append(f"def {a}_{b}({c}, {b}=None):\n    {a} = {c}.{b}({c})\n    return {a} + {c}\n\n")
    return "".join(out)


@pytest.fixture(scope="module")
def pkg_corpus(tmp_path_factory):
    """alpha/ beta/ gamma/ with 12 files each (~3.3 KB); every package has held-out files at val_fraction 0.25."""
    root = tmp_path_factory.mktemp("pkgcorpus") / "corpus"
    rng = np.random.default_rng(0)
    for pkg, words in WORDS.items():
        (root / pkg).mkdir(parents=True)
        for i in range(12):
            (root / pkg / f"mod{i}.py").write_text(_code(rng, words))
    for pkg in WORDS:  # the hash split is deterministic: the fixture's file names give each package val files
        assert any(is_validation(f"{pkg}/mod{i}.py", 0.25) for i in range(12)), pkg
    return root


def _cfg(out, corpus, **kw):
    d = dict(TINY, out_dir=str(out), corpus=str(corpus))
    d.update(kw)
    return TrainConfig.build(None, d)


# ---------------------------------------------------------------- data


def test_package_labels_and_split(pkg_corpus):
    assert package_of("email/mime/text.py") == "email" and package_of("os.py") is None
    s = package_split(str(pkg_corpus), 0.25, 3, min_train_chars=1000, min_val_chars=500)
    assert s.classes == ["alpha", "beta", "gamma"]
    tr = {d.key for d, _ in s.train}
    va = {d.key for d, _ in s.val}
    assert tr and va and not tr & va  # held out by file
    assert all(is_validation(k, 0.25) for k in va)
    assert all(s.classes[y] == package_of(d.key) for d, y in s.train + s.val)
    with pytest.raises(Exception, match="n_classes=4"):
        package_split(str(pkg_corpus), 0.25, 4)
    ids, lens, ys = token_chunks(s.train, lambda t: list(t.encode()), 64, max_chunks_per_file=3)
    assert ids.shape[1] == 64 and len(ids) == len(lens) == len(ys) <= 3 * len(s.train)
    assert (lens >= 16).all() and (lens <= 64).all()
    assert all((ids[i, lens[i]:] == 0).all() for i in range(len(ids)))
    texts, ty = text_chunks(s.val, max_chars=200, max_chunks_per_file=2)
    assert len(texts) == len(ty) and all(len(t) <= 200 for t in texts)


def test_pool_modes():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    n = torch.tensor([4, 2])
    torch.testing.assert_close(pool(h, n, "mean"), torch.stack([h[0].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(pool(h, n, "last"), torch.stack([h[0, 3], h[1, 1]]))
    torch.testing.assert_close(pool(h, n, "first"), h[:, 0])
    with pytest.raises(ValueError, match="lengths"):
        pool(h, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="mode"):
        pool(h, n, "max")
    with pytest.raises(ValueError, match="n_classes"):
        ClassificationHead(8, 1)


# ---------------------------------------------------------------- sampling and weighting


def test_sampling_proportions_follow_temperature(pkg_corpus, tmp_path):
    sizes = {"lm": 900, "pkg": 100}
    assert sampling_probs(sizes, "proportional") == pytest.approx({"lm": 0.9, "pkg": 0.1})
    assert sampling_probs(sizes, "temperature", 2.0) == pytest.approx({"lm": 0.75, "pkg": 0.25})  # 30 : 10
    assert sampling_probs(sizes, "temperature", 1e9)["pkg"] == pytest.approx(0.5)
    assert sampling_probs(sizes, "all") == {"lm": 1.0, "pkg": 1.0}
    # the draws of a run follow its probabilities (binomial, 5 sigma)
    for mode, temp in (("proportional", 1.0), ("temperature", 3.0)):
        t = Trainer(_cfg(tmp_path / mode, pkg_corpus, tasks="lm,pkg", task_sampling=mode, task_temperature=temp,
                         max_steps=1), log=lambda m: None)
        t.setup()
        p = t.tasks.probs["pkg"]
        expect = sampling_probs(t.tasks.sizes, mode, temp)["pkg"]
        assert p == pytest.approx(expect) and 0.02 < p < 0.98
        n = 4000
        draws = [t.tasks.sample(step, 0) for step in range(n)]
        assert all(len(d) == 1 for d in draws)
        k = sum(d == ["pkg"] for d in draws)
        assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p)), (mode, k, n * p)
        assert t.tasks.sample(7, 0) == t.tasks.sample(7, 0)  # keyed by (seed, step, micro): resumable


def test_uncertainty_weights_reach_log_of_loss():
    """exp(-s) L + s is minimised at s = log L: the learned weight of a task is 1 / its loss."""
    heads = TaskHeads(["a", "b"], {}, {"a": 1.0, "b": 1.0}, uncertainty=True)
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        heads.combine({"a": torch.tensor(4.0), "b": torch.tensor(0.5)}).backward()
        opt.step()
    torch.testing.assert_close(heads.log_var.detach(), torch.tensor([math.log(4.0), math.log(0.5)]), atol=0.02, rtol=0)
    w = heads.effective_weights()
    assert w["a"] == pytest.approx(0.25, rel=0.03) and w["b"] == pytest.approx(2.0, rel=0.03)
    fixed = TaskHeads(["a", "b"], {}, {"a": 2.0, "b": 0.5}, uncertainty=False)
    assert not list(fixed.parameters())
    assert float(fixed.combine({"a": torch.tensor(1.0), "b": torch.tensor(4.0)})) == pytest.approx(4.0)


def test_parse_weights_and_bad_fields(pkg_corpus, tmp_path):
    assert parse_weights("pkg=0.5", ["lm", "pkg"]) == {"lm": 1.0, "pkg": 0.5}
    for field, value, match in (("tasks", "lm,nope", "unknown task"), ("tasks", "lm,lm", "twice"),
                                ("task_weights", "pkg=x", "number"), ("task_weights", "cls=1", "task=weight"),
                                ("task_sampling", "random", "task_sampling"), ("task_weighting", "gradnorm", "task_weighting"),
                                ("task_temperature", "0", "task_temperature"), ("cls_classes", "1", "cls_classes"),
                                ("cls_pool", "first", "cls_pool")):
        with pytest.raises(ConfigError, match=match):
            _cfg(tmp_path / "bad", pkg_corpus, **{"tasks": "lm,pkg", field: value})
    with pytest.raises(ConfigError, match="model_impl"):
        _cfg(tmp_path / "bad", pkg_corpus, tasks="pkg", model_impl="plain")


# ---------------------------------------------------------------- the loop


def test_multitask_gradients_reach_every_head(pkg_corpus, tmp_path):
    t = Trainer(_cfg(tmp_path / "run", pkg_corpus, tasks="lm,pkg", task_weighting="uncertainty", max_steps=1),
                log=lambda m: None)
    t.setup()
    model = unwrap(t.model)
    x, y = t.sampler.batch(0)
    loss = t.tasks.loss(model, 0, 0, (x, y))
    loss.backward()
    groups = {"trunk": [p for n, p in model.named_parameters() if not n.startswith("task_heads.")],
              "pkg head": list(model.task_heads.heads["pkg"].parameters()),
              "log_var": [model.task_heads.log_var]}
    for what, params in groups.items():
        assert params and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params), what
    assert model.task_heads.log_var.grad.shape == (2,) and bool((model.task_heads.log_var.grad != 0).all())
    in_opt = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for ps in groups.values() for p in ps)


def test_classification_head_trains_and_checkpoint_loads(pkg_corpus, tmp_path):
    from fmkernels.train.evaluate import evaluate_checkpoint

    out = tmp_path / "cls"
    s = train(_cfg(out, pkg_corpus, tasks="pkg", max_steps=40, lr=3e-3), log=lambda m: None)
    r = s["tasks"]["pkg"]
    assert r["classes"] == ["alpha", "beta", "gamma"]
    assert r["val_acc"] >= 0.7 and r["val_acc"] > r["majority_acc"] + 0.3, r  # three classes: majority ~ 0.4
    rows = list(csv.DictReader(open(out / "tasks.csv")))
    tr = [float(x["train_loss"]) for x in rows if x["kind"] == "train"]
    assert tr[-1] < 0.5 * tr[0]
    assert json.loads((out / "summary.json").read_text())["tasks"]["pkg"]["val_acc"] == r["val_acc"]
    ev = evaluate_checkpoint(out)  # fmk eval: the trunk of a task checkpoint (heads stripped)
    assert math.isfinite(ev["val_bpb"])


def test_multitask_run_learns_uncertainty_weights(pkg_corpus, tmp_path):
    s = train(_cfg(tmp_path / "mt", pkg_corpus, tasks="lm,pkg", task_weighting="uncertainty", max_steps=30, lr=1e-2),
              log=lambda m: None)
    r = s["tasks"]
    assert {"lm", "pkg", "weights"} <= set(r)
    w = r["weights"]
    # the byte-level LM loss (~2-4 nats) stays far above the easy classification loss: lm is down-weighted
    assert w["lm"] < 0.95 and w["pkg"] > w["lm"], w
    assert r["pkg"]["val_acc"] > r["pkg"]["majority_acc"]


def test_task_head_on_frozen_lora_trunk(pkg_corpus, tmp_path):
    """LoRA freezes the trunk's base weights; the task head attached after it still trains."""
    t = Trainer(_cfg(tmp_path / "lora", pkg_corpus, tasks="pkg", lora_rank=2, max_steps=1), log=lambda m: None)
    t.setup()
    model = unwrap(t.model)
    head = model.task_heads.heads["pkg"].proj.weight
    assert head.requires_grad
    base = [p for n, p in model.named_parameters() if n.endswith("base.weight")]
    assert base and not any(p.requires_grad for p in base)
    before = head.detach().clone()
    t.train_step()
    assert not torch.equal(before, head.detach())


def test_sampled_multitask_run_resumes_exactly(pkg_corpus, tmp_path):
    """A sampled, uncertainty-weighted run stopped at step 6 and resumed equals the uninterrupted 12-step run."""
    kw = dict(tasks="lm,pkg", task_sampling="temperature", task_temperature=2.0, task_weighting="uncertainty",
              save_every=6, final_eval=False, min_lr_ratio=1.0)  # constant lr: the shorter first run keeps the schedule
    full = tmp_path / "full"
    train(_cfg(full, pkg_corpus, max_steps=12, **kw), log=lambda m: None)
    part = tmp_path / "part"
    train(_cfg(part, pkg_corpus, max_steps=6, **kw), log=lambda m: None)
    with open(part / "tasks.csv", "a") as f:  # rows an interrupted run logged past its checkpoint
        f.write("9,train,lm,1.0,1.0,0.5,,,,\n")
    train(_cfg(part, pkg_corpus, max_steps=12, resume=True, **kw), log=lambda m: None)
    from fmkernels.train import checkpoint as ckpt

    a = ckpt.load_checkpoint(ckpt.list_checkpoints(full)[-1])["model"]
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(part)[-1])["model"]
    assert "task_heads.log_var" in a and "task_heads.heads.pkg.proj.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [r for r in csv.DictReader(open(part / "tasks.csv")) if r["kind"] == "train"]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps.count(9) <= 2  # the stale row was dropped; each task logs once per step
