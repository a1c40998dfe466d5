"""Issue 22's pretraining switches (Muon, warmup-stable-decay, QK-norm, logit soft-capping), the compressor
yardstick in the run's summary and in `fmk eval`, and the ablation harness (scripts/pretrain_ablation.py)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from trainer_helpers import REPO, small_corpus  # noqa: F401  (fixture)

from fmkernels.models import PlainTransformer, Transformer, TransformerConfig, fmk_to_plain_state_dict
from fmkernels.models.config import ConfigError
from fmkernels.train import TrainConfig, lr_at
from fmkernels.train import checkpoint as ckpt
from fmkernels.train.metrics import yardstick_lines
from fmkernels.train.optim import MultiOptimizer, is_muon_param, make_optimizer

TINY = ["--preset", "tiny", "--tokenizer", "byte", "--seq_len", "32", "--batch_size", "4", "--progress", "false",
        "--sample_tokens", "0", "--eval_every", "1000", "--log_every", "1"]


def cli(capsys, *args):
    from fmkernels.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    o = capsys.readouterr()
    return rc, o.out + o.err


def _tiny_model(**kw):
    cfg = TransformerConfig(**{**dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32), **kw})
    torch.manual_seed(0)
    return cfg, Transformer(cfg)


# ------------------------------------------------------------------------------------------------------ Muon
def _newton_schulz(g: torch.Tensor, dtype=torch.float32, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration (a, b, c) = (3.4445, -4.7750, 2.0315):
    X <- a X + (b A + c A^2) X with A = X X^T, X0 = G / ||G||_F (wide orientation)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).float()


def _one_step(cfg_kw):
    mcfg, model = _tiny_model()
    cfg = TrainConfig(**{**dict(optimizer="muon", lr=0.01, weight_decay=0.1), **cfg_kw})
    opt = make_optimizer(model, cfg, fsdp=False, n_layers=mcfg.n_layers)
    for g in opt.param_groups:  # what the loop does every step
        g["lr"] = cfg.lr * g["lr_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return cfg, model, opt, before, grads


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_batched_muon_matches_torch_muon(nesterov, adjust):
    """BatchedMuon (same-shaped matrices orthogonalized by one bmm chain) against torch.optim.Muon over 3 steps, two
    groups, mixed shapes (tall, wide, square): bf16 Newton-Schulz rounding only (the update is O(lr) per entry)."""
    from fmkernels.train.muon import BatchedMuon
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 40), (48, 16), (24, 24), (16, 40)]
    p_ref = [torch.randn(s) for s in shapes]
    p_ours = [p.clone() for p in p_ref]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    ref = torch.optim.Muon([{"params": p_ref[:3]}, {"params": p_ref[3:], "lr": 0.01}], **kw)
    ours = BatchedMuon([{"params": p_ours[:3]}, {"params": p_ours[3:], "lr": 0.01}], **kw)
    for step in range(3):
        for a, b in zip(p_ref, p_ours):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step * 10 + a.shape[0]))
            b.grad = a.grad.clone()
        ref.step()
        ours.step()
        for a, b in zip(p_ref, p_ours):
            # each step moves an entry by ~lr * adjusted ratio * |O| (<~0.1); bf16 NS rounding ~2^-8 of that
            torch.testing.assert_close(b, a, rtol=0, atol=2e-3)
    for a, b in zip(p_ref, p_ours):
        torch.testing.assert_close(ours.state[b]["momentum_buffer"], ref.state[a]["momentum_buffer"])
    ours.load_state_dict(ref.state_dict())  # the same state format both ways


@pytest.mark.parametrize("muon_lr", [None, 0.02])
def test_muon_step_matches_formula(muon_lr):
    cfg, model, opt, before, grads = _one_step(dict(muon_lr=muon_lr))
    assert isinstance(opt, MultiOptimizer) and opt.kinds() == ["Muon", "AdamW"]
    names = {n for n, p in model.named_parameters() if is_muon_param(n, p)}
    assert names == {f"layers.{i}.{m}.weight" for i in range(2) for m in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")}
    m = cfg.muon_momentum
    for n in sorted(names):
        w0, g, w1 = before[n], grads[n], dict(model.named_parameters())[n].detach()
        buf = (1 - m) * g  # momentum buffer after one step from zero
        nest = g + m * (buf - g)  # Nesterov: g.lerp(buf, m)
        upd = _newton_schulz(nest)  # fp32 reference; Muon iterates in bf16
        bf16_err = float((_newton_schulz(nest, torch.bfloat16) - upd).abs().max())  # a plain bf16 run's error
        A, B = w0.shape
        lr = cfg.lr if muon_lr is None else muon_lr
        adj = lr * (0.2 * math.sqrt(max(A, B)) if muon_lr is None else math.sqrt(max(1, A / B)))
        got = (w0 * (1 - lr * cfg.weight_decay) - w1) / adj  # the orthogonalized step Muon took
        torch.testing.assert_close(got, upd, rtol=0, atol=2 * bf16_err, msg=lambda s: f"{n}: {s}")
        # orthogonalized: the singular values of g's significant directions move to ~1 (0.5-1.5 by design)
        sg = torch.linalg.svdvals(nest)
        r = int((sg > 0.05 * sg[0]).sum())  # a 32-token batch: g has rank <= 32
        s = torch.linalg.svdvals(upd)
        assert float(sg[0] / sg[r - 1]) > 2 and 0.3 < float(s[r - 1]) and float(s[0]) < 1.6, (n, r, s)
    # AdamW keeps the rest: after one step from zero, a norm weight (no decay) moves by lr * g / (|g| + eps)
    w0, g = before["layers.0.attn_norm.weight"], grads["layers.0.attn_norm.weight"]
    w1 = model.layers[0].attn_norm.weight.detach()
    torch.testing.assert_close(w1, w0 - cfg.lr * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-6)
    # the tied embedding / head: AdamW with decay
    e0, ge = before["tok_emb.weight"], grads["tok_emb.weight"]
    expect = e0 * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * ge / (ge.abs() + 1e-8)
    torch.testing.assert_close(model.tok_emb.weight.detach(), expect, rtol=1e-5, atol=1e-6)


def test_muon_state_round_trip_and_mismatch():
    cfg, model, opt, _, _ = _one_step({})
    sd = opt.state_dict()
    _, model2 = _tiny_model()
    opt2 = make_optimizer(model2, cfg, fsdp=False, n_layers=2)
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(opt.state) > 0
    adam = make_optimizer(model2, TrainConfig(optimizer="adamw"), fsdp=False, n_layers=2)
    with pytest.raises(ValueError, match="optimizer"):
        opt2.load_state_dict(adam.state_dict())
    with pytest.raises(ConfigError, match="fsdp"):
        TrainConfig.build(overrides=dict(optimizer="muon", distributed="fsdp"))


# ------------------------------------------------------------------------------------------------------ schedule
def test_optimizer_auto_is_muon_only_for_pretraining_from_scratch(tmp_path):
    from fmkernels.train.optim import resolved_optimizer
    assert TrainConfig().optimizer == "auto" and resolved_optimizer(TrainConfig()) == "muon"
    for kw in (dict(lora_rank=4), dict(qat="int8"), dict(int8_training=True), dict(sparsity="2:4"),
               dict(distributed="fsdp")):
        assert resolved_optimizer(TrainConfig(**kw)) == "adamw", kw
    assert resolved_optimizer(TrainConfig(), fsdp=True) == "adamw"
    assert resolved_optimizer(TrainConfig(optimizer="muon")) == "muon"
    assert resolved_optimizer(TrainConfig(optimizer="adamw")) == "adamw"
    TrainConfig.build(overrides=dict(distributed="fsdp")).validate()  # auto + fsdp is fine; an explicit muon is not
    # a module tree without block matrices: auto falls back to AdamW instead of refusing
    opt = make_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 4)), TrainConfig(), fsdp=False)
    assert isinstance(opt, torch.optim.AdamW)


def test_wsd_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="wsd", decay_fraction=0.2)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)  # warmup as cosine's
    assert lr_at(cfg, 9, 0.09) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(1.0)  # stable
    assert lr_at(cfg, 80, 0.8) == pytest.approx(1.0)  # decay starts at 1 - decay_fraction
    assert lr_at(cfg, 90, 0.9) == pytest.approx(0.55)  # linear to min_lr_ratio
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    assert TrainConfig().lr_schedule == "wsd"  # the default since the make train ablation
    cos = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="cosine")
    assert lr_at(cos, 50, 0.5) == pytest.approx(0.55)
    for bad in (dict(lr_schedule="linear"), dict(decay_fraction=0.0), dict(optimizer="sgd"), dict(muon_lr=-1.0),
                dict(logit_softcap=0.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig.build(overrides=bad)


# ------------------------------------------------------------------------------------------------------ model
def _pair(**kw):
    cfg, fm = _tiny_model(**kw)
    with torch.no_grad():  # non-trivial norm weights, so that the q/k norms' scales are exercised
        for n, p in fm.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    pl = PlainTransformer(cfg)
    pl.load_state_dict(fmk_to_plain_state_dict(fm.state_dict(), cfg))
    return cfg, fm, pl


def test_qk_norm_matches_plain_and_a_direct_formula():
    cfg, fm, pl = _pair(qk_norm=True)
    x = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fm(x), pl(x), rtol=1e-4, atol=1e-5)  # same tolerance as test_models' twin test
    torch.testing.assert_close(fm(x, y), pl(x, y), rtol=1e-5, atol=1e-6)
    # the norm itself: q_norm over each head's D, weight per D
    att = fm.layers[0].attn
    q = torch.randn(2, 5, cfg.n_heads, cfg.head_dim)
    direct = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * att.q_norm.weight
    torch.testing.assert_close(att.q_norm(q), direct, rtol=1e-5, atol=1e-6)
    # and it changes the model (not a silent no-op)
    cfg0, fm0 = _tiny_model()
    fm0.load_state_dict({k: v for k, v in fm.state_dict().items() if "q_norm" not in k and "k_norm" not in k})
    assert not torch.allclose(fm0(x), fm(x), atol=1e-3)


def test_logit_softcap_matches_plain_and_bounds_logits():
    cap = 2.0
    cfg, fm, pl = _pair(logit_softcap=cap)
    x = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(2))
    y[0, :4] = -100  # ignored targets
    with torch.no_grad():
        fm.tok_emb.weight.mul_(50)  # large logits, so that the cap bites
        pl.tok_emb.weight.mul_(50)
    lf = fm(x).detach()
    assert float(lf.abs().max()) <= cap
    torch.testing.assert_close(lf, pl(x), rtol=1e-4, atol=1e-5)
    h = fm.hidden_states(x).detach()
    raw = torch.nn.functional.linear(h, fm.tok_emb.weight.detach())
    assert float(raw.abs().max()) > 2 * cap
    want = torch.nn.functional.cross_entropy((cap * torch.tanh(raw / cap)).reshape(-1, 97), y.reshape(-1))
    torch.testing.assert_close(fm(x, y), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fm(x, y, reduction="sum"), pl(x, y, reduction="sum"), rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="logit_softcap"):
        TransformerConfig(logit_softcap=-1.0)


# ------------------------------------------------------------------------------------------------------ runs
def test_switches_train_resume_and_summary_yardstick(tmp_path, small_corpus, capsys, monkeypatch):
    monkeypatch.setenv("FMK_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    sw = ["--optimizer", "muon", "--lr_schedule", "wsd", "--qk_norm", "true", "--logit_softcap", "30"]
    rc, text = cli(capsys, "train", *TINY, *sw, "--corpus", small_corpus, "--max_steps", 4, "--out_dir", out)
    assert rc == 0, text
    rc, text = cli(capsys, "train", *TINY, *sw, "--corpus", small_corpus, "--max_steps", 8, "--out_dir", out,
                   "--resume")
    assert rc == 0 and "resumed from" in text, text
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 8 and math.isfinite(s["val_bpb"])
    xz = s["compressor_bpb"]["xz"]
    assert 0 < xz["with_train"] <= xz["alone"] < 8 and s["compressor_time_s"] >= 0
    assert f"validation (full split): loss {s['val_loss']:.4f}, {s['val_bpb']:.4f} bits per byte" in text
    assert f"xz -9e {xz['alone']:.3f} bits per byte alone, {xz['with_train']:.3f} with the training split" in text
    st = json.loads((ckpt.list_checkpoints(out)[-1] / "state.json").read_text())
    assert st["config"]["optimizer"] == "muon" and st["config"]["qk_norm"] is True
    rc, text = cli(capsys, "eval", "--checkpoint", out)
    assert rc == 0 and "compressor yardstick (same validation bytes): xz -9e" in text, text
    rc, text = cli(capsys, "eval", "--checkpoint", out, "--no_yardstick")
    assert rc == 0 and "yardstick" not in text, text


def test_yardstick_lines():
    bpb = {"xz": {"alone": 1.497, "with_train": 1.130}}
    (line,) = yardstick_lines(bpb, 1.285, 12.0)
    assert line == ("compressor yardstick (same validation bytes): xz -9e 1.497 bits per byte alone, 1.130 with the "
                    "training split as context; this model 1.285 (+0.155 vs xz with context: behind) "
                    "[12.0 s, not training time]")
    assert "beats" in yardstick_lines(bpb, 1.0)[0] and yardstick_lines(None, 1.0) == []


@pytest.mark.slow
def test_ablation_harness_tiny_budget(tmp_path, small_corpus):
    doc = tmp_path / "pretraining.md"
    doc.write_text("# Pretraining\n\nintro kept\n")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", FMK_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "scripts/pretrain_ablation.py", "--budget_s", "3", "--only", "default,no_wsd",
                        "--corpus", str(small_corpus), "--doc", str(doc), "--runs_dir", str(tmp_path / "runs"),
                        "--extra", "--preset tiny --tokenizer byte --seq_len 32 --batch_size 4 --eval_every 1000"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    md = doc.read_text()
    assert md.startswith("# Pretraining\n\nintro kept\n")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0].startswith("| technique | switch | steps | tokens/s | full-split bits per byte | delta vs default")
    assert len(rows) == 3 and rows[1].startswith("| default |") and "--lr_schedule cosine" in rows[2]
    res = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [x["name"] for x in res["runs"]] == ["default", "no_wsd"]
    assert all(x["steps"] > 0 and math.isfinite(x["val_bpb"]) for x in res["runs"])
    # a later invocation joins the earlier rows (--include), in the variants' order, each naming its commit
    r = subprocess.run([sys.executable, "scripts/pretrain_ablation.py", "--budget_s", "3", "--only", "no_qk_norm",
                        "--include", str(tmp_path / "runs"), "--corpus", str(small_corpus), "--doc", str(doc),
                        "--runs_dir", str(tmp_path / "runs2"),
                        "--extra", "--preset tiny --tokenizer byte --seq_len 32 --batch_size 4 --eval_every 1000"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in doc.read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert [ln.split("|")[1].strip() for ln in rows[1:]] == ["default", "no_wsd", "no_qk_norm"]
    assert "run earlier at commit" in doc.read_text()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "scripts/pretrain_ablation.py", "--only", "nosuch", "--doc", str(doc)],
                       check=True, capture_output=True, env=env, cwd=REPO, timeout=120)
