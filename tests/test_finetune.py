"""Fine-tuning switches of the one training loop: each test fails if its switch silently did nothing.
Tiny models, byte tokenizer, a few steps."""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn
from trainer_helpers import small_corpus  # noqa: F401  (fixture)

from fmkernels.models import Transformer
from fmkernels.models.config import PRESETS, ConfigError, TransformerConfig
from fmkernels.nn.lora import LoRALinear, apply_lora, merge_lora
from fmkernels.train import TrainConfig, train
from fmkernels.train import checkpoint as ckpt
from fmkernels.train.finetune import lr_scale

TINY = dict(preset="tiny", tokenizer="byte", seq_len=32, batch_size=4, progress=False, sample_tokens=0,
            eval_every=1000, log_every=1, final_eval=False, warmup_steps=0, lr=1e-2, weight_decay=0.0, dtype="fp32")


def _cfg(out, corpus, **kw):
    d = dict(TINY, out_dir=str(out), corpus=str(corpus))
    d.update(kw)
    return TrainConfig.build(None, {k: v for k, v in d.items()})


def _state(run_dir):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model pretrained for a few steps on one corpus (the 'pretrained checkpoint')."""
    from fmkernels.data import stdlib_files

    root = tmp_path_factory.mktemp("pre")
    a, b = root / "corpus_a", root / "corpus_b"
    a.mkdir()
    b.mkdir()
    files = stdlib_files()
    for rel, path in files[:20]:
        (a / rel.replace("/", "__")).write_bytes(path.read_bytes())
    for rel, path in files[40:60]:  # a different set of files: the "new domain"
        (b / rel.replace("/", "__")).write_bytes(path.read_bytes())
    out = root / "run"
    s = train(_cfg(out, a, max_steps=8), log=lambda m: None)
    assert s["exit_code"] == 0
    return dict(run=out, corpus_a=a, corpus_b=b, root=root)


def _metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["loss"] not in ("", None)]


# ---------------------------------------------------------------- fmk finetune --from
def test_finetune_from_loads_checkpoint_and_trains(pretrained, tmp_path, capsys):
    from fmkernels.cli import main
    from fmkernels.data import BatchSampler, prepare_data

    out = tmp_path / "ft"
    rc = main(["finetune", "--from", str(pretrained["run"]), "--corpus", str(pretrained["corpus_b"]), "--preset", "tiny",
               "--seq_len", "32", "--batch_size", "4", "--progress", "false", "--sample_tokens", "0",
               "--eval_every", "1000", "--log_every", "1", "--max_steps", "6", "--out_dir", str(out),
               "--dtype", "fp32", "--warmup_steps", "0", "--lr", "1e-2"])
    assert rc == 0, capsys.readouterr()
    rows = _metrics(out)
    # the loss logged at step 1 is the loss of batch 0 before any update: it must be the pretrained model's
    pre = ckpt.load_checkpoint(ckpt.list_checkpoints(pretrained["run"])[-1])
    model = Transformer(TransformerConfig.from_dict(pre["state"]["model_config"]))
    model.load_state_dict(pre["model"])
    data = prepare_data(str(pretrained["corpus_b"]), "byte", 4096, 0.05, log=lambda m: None,
                        tokenizer_dir=str(ckpt.list_checkpoints(pretrained["run"])[-1] / "tokenizer"))
    x, y = BatchSampler(data.train, 32, 4, 0).batch(0, 0)
    with torch.no_grad():
        want = float(model(x, y))
    assert abs(float(rows[0]["loss"]) - want) < 1e-4, (rows[0]["loss"], want)
    # a freshly initialised model has a clearly different loss on that batch (the load was not a no-op)
    torch.manual_seed(0)
    fresh = Transformer(TransformerConfig.from_dict(pre["state"]["model_config"]))
    with torch.no_grad():
        assert abs(float(fresh(x, y)) - want) > 1e-2
    # and it trained: the weights moved away from the pretrained ones
    ft = _state(out)["model"]
    assert any(not torch.equal(ft[k], pre["model"][k]) for k in pre["model"])
    assert len(rows) == 6


def test_finetune_requires_from(capsys):
    from fmkernels.cli import main

    assert main(["finetune", "--preset", "tiny"]) == 2
    assert "--from" in capsys.readouterr().err


def test_finetune_refuses_to_overwrite_its_source(pretrained, capsys):
    from fmkernels.cli import main

    n_before = len(ckpt.list_checkpoints(pretrained["run"]))
    rc = main(["finetune", "--from", str(pretrained["run"]), "--out_dir", str(pretrained["run"]), "--preset", "tiny",
               "--tokenizer", "byte", "--max_steps", "1", "--progress", "false", "--sample_tokens", "0",
               "--corpus", str(pretrained["corpus_b"])])
    assert rc == 2 and "fine-tune into another out_dir" in capsys.readouterr().err
    assert len(ckpt.list_checkpoints(pretrained["run"])) == n_before


# ---------------------------------------------------------------- freezing, layer-wise lr decay
def test_frozen_params_unchanged(pretrained, tmp_path):
    out = tmp_path / "frozen"
    s = train(_cfg(out, pretrained["corpus_b"], init_from=str(pretrained["run"]), freeze_embeddings=True,
                   freeze_blocks=1, max_steps=4), log=lambda m: None)
    assert s["exit_code"] == 0
    before = _state(pretrained["run"])["model"]
    after = _state(out)["model"]
    frozen = [k for k in before if k.startswith("tok_emb.") or k.startswith("layers.0.")]
    trained = [k for k in before if k.startswith("layers.1.")]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def test_freeze_limits(pretrained, tmp_path):
    n = PRESETS["tiny"]["n_layers"]
    cfg = _cfg(tmp_path / "all", pretrained["corpus_b"], init_from=str(pretrained["run"]), freeze_embeddings=True,
               freeze_blocks=n, max_steps=2)
    # the final norm still trains; freezing more blocks than exist is refused
    assert train(cfg, log=lambda m: None)["exit_code"] == 0
    with pytest.raises(ConfigError, match="freeze_blocks"):
        train(_cfg(tmp_path / "bad", pretrained["corpus_b"], freeze_blocks=n + 1, max_steps=1), log=lambda m: None)


def test_layer_lr_decay_groups(pretrained, tmp_path):
    from fmkernels.train.trainer import Trainer

    cfg = _cfg(tmp_path / "llrd", pretrained["corpus_b"], init_from=str(pretrained["run"]), layer_lr_decay=0.5,
               max_steps=1)
    t = Trainer(cfg, log=lambda m: None)
    t.setup()
    model = t.model
    L = t.mcfg.n_layers
    scale_of = {id(p): g["lr_scale"] for g in t.opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert scale_of[id(p)] == pytest.approx(lr_scale(name, L, 0.5)), name
    assert scale_of[id(model.tok_emb.weight)] == pytest.approx(0.5 ** (L + 1))
    assert scale_of[id(model.layers[0].attn.wqkv.weight)] == pytest.approx(0.5 ** L)
    assert scale_of[id(model.layers[L - 1].mlp.w2.weight)] == pytest.approx(0.5)
    assert scale_of[id(model.norm.weight)] == 1.0
    # the loop applies the scale: after one step each group's lr is the schedule's lr times its scale
    t.run()
    for g in t.opt.param_groups:
        assert g["lr"] == pytest.approx(t.lr * g["lr_scale"])


# ---------------------------------------------------------------- LoRA
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**dict(PRESETS["tiny"], vocab_size=256, max_seq_len=32)))


def test_lora_initially_identity_and_trains_only_adapters():
    model = _tiny_model()
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, rank=4, alpha=8, targets="wqkv,wo,w13,w2")
    assert len(names) == 4 * model.cfg.n_layers
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # B = 0: unchanged at start
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():  # every original weight, now under .base for wrapped layers
        k2 = k if k in after else k.replace(".weight", ".base.weight")
        assert torch.equal(after[k2], v), k
    assert all(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in model.modules() if isinstance(m, LoRALinear))


def test_lora_merge_reproduces_outputs():
    model = _tiny_model()
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)  # a non-trivial adapter
    model.eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        adapted = model(x)
        base = _tiny_model()(x)
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the outputs
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m.attn.wqkv) is nn.Linear for m in model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_lora_on_quantized_base(kind):
    from fmkernels.nn.quantized import Int4Linear, Int8Linear

    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    q = (Int8Linear if kind == "int8" else Int4Linear).from_float(dense)
    lora = LoRALinear(q, rank=4, alpha=8)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    bufs = {k: v.clone() for k, v in lora.base.state_dict().items()}
    x = torch.randn(8, 128)
    target = torch.randn(8, 64)
    opt = torch.optim.AdamW([lora.lora_A, lora.lora_B], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = ((lora(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for k, v in lora.base.state_dict().items():
        assert torch.equal(v, bufs[k]), k  # the quantized base is untouched
    # gradients flow through the frozen quantized base to the input (adapters in earlier layers train):
    # d/dx of sum(base(x) * g) is g @ W_dequantized
    xg = torch.randn(8, 128, requires_grad=True)
    g = torch.randn(8, 64)
    (lora(xg) * g).sum().backward()
    want = g @ (q.dequantized_weight() + lora.delta_weight())
    torch.testing.assert_close(xg.grad, want, rtol=1e-4, atol=1e-4)
    lora.eval()
    with torch.no_grad():
        merged = lora.merged()
        torch.testing.assert_close(merged(x), lora(x), rtol=2e-2, atol=2e-2)
        # merged = dequantized base + adapter delta, exactly
        torch.testing.assert_close(merged.weight, q.dequantized_weight() + lora.delta_weight())


@pytest.mark.parametrize("group_size", [None, 64])
def test_qlora_int4_base_any_width(group_size):
    # dim 80 (no multiple of 128 or 64): int4 groups pad the last one with zeros; the default picks the group that
    # pads least (80 -> 32: 96), an explicit one is kept (64: 128). Output = dequantized weights times x.
    from fmkernels.nn.quantized import Int4Linear
    from fmkernels.train.model_source import attach_lora

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, dim=80, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                          max_seq_len=16))
    attach_lora(model, dict(lora_rank=4, lora_alpha=8.0, lora_base="int4", lora_group_size=group_size))
    wo = model.layers[0].attn.wo.base
    assert isinstance(wo, Int4Linear) and wo.group_size == (group_size or 32)
    x = torch.randn(2, 5, 80)
    with torch.no_grad():
        want = x @ wo.dequantized_weight()[:, :80].t()
        torch.testing.assert_close(wo(x), want, rtol=2e-2, atol=2e-2)
    loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()


def test_lora_trainable_fraction_default_model():
    cfg = TrainConfig()
    model = Transformer(cfg.model_config(cfg.vocab_size))
    apply_lora(model, rank=8, alpha=16, targets=cfg.lora_targets)
    n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    assert 0 < n_tr / n_all < 0.05, n_tr / n_all


def test_lora_no_match_is_an_error():
    with pytest.raises(ValueError, match="no linear module"):
        apply_lora(_tiny_model(), targets="nope")


def test_finetune_lora_run_and_eval(pretrained, tmp_path, capsys):
    """LoRA through the trainer: only adapters change; fmk eval loads the checkpoint (adapters merged)."""
    from fmkernels.cli import main

    out = tmp_path / "lora"
    s = train(_cfg(out, pretrained["corpus_b"], init_from=str(pretrained["run"]), lora_rank=4, lora_alpha=8,
                   max_steps=4, final_eval=True), log=lambda m: None)
    assert s["exit_code"] == 0
    before = _state(pretrained["run"])["model"]
    after = _state(out)["model"]
    for k, v in before.items():
        k2 = k if k in after else k.replace(".weight", ".base.weight")
        assert torch.equal(after[k2], v), k
    assert any(k.endswith("lora_B") and after[k].abs().max() > 0 for k in after)
    rc = main(["eval", "--checkpoint", str(out), "--json"])
    text = capsys.readouterr().out
    assert rc == 0
    assert abs(json.loads(text)["val_bpb"] - s["val_bpb"]) < 1e-3
    # fmk merge writes a dense checkpoint (no adapter keys) that evaluates the same
    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(out), "--out_dir", str(merged)]) == 0
    sd = _state(merged)["model"]
    assert not any("lora_" in k or ".base." in k for k in sd) and set(sd) == set(before)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(merged), "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["val_bpb"] - s["val_bpb"]) < 1e-3


def test_finetune_lora_exact_resume(pretrained, tmp_path):
    """A LoRA fine-tune stopped and resumed ends where a straight run ends (adapters + optimizer restored)."""
    # constant lr (min_lr_ratio 1): the first run's shorter max_steps must not change the schedule
    kw = dict(init_from=str(pretrained["run"]), lora_rank=4, max_steps=4, save_every=2, min_lr_ratio=1.0)
    straight = train(_cfg(tmp_path / "s", pretrained["corpus_b"], **kw), log=lambda m: None)
    train(_cfg(tmp_path / "r", pretrained["corpus_b"], **dict(kw, max_steps=2)), log=lambda m: None)
    resumed = train(_cfg(tmp_path / "r", pretrained["corpus_b"], **kw, resume=True), log=lambda m: None)
    assert resumed["step"] == 4
    assert resumed["final_train_loss"] == straight["final_train_loss"]


def test_finetune_qlora_int8_run(pretrained, tmp_path):
    out = tmp_path / "qlora"
    s = train(_cfg(out, pretrained["corpus_b"], init_from=str(pretrained["run"]), lora_rank=4, lora_base="int8",
                   max_steps=3), log=lambda m: None)
    assert s["exit_code"] == 0 and np.isfinite(s["final_train_loss"])
    after = _state(out)["model"]
    assert any(k.endswith("base.weight_packed") for k in after)
    assert any(k.endswith("lora_B") and after[k].abs().max() > 0 for k in after)


def test_qlora_run_is_usable_afterwards(pretrained, tmp_path, capsys, kind="int8"):
    """Issue 15 bug 1: eval, generate, merge and finetune --from on what a QLoRA run wrote (the quantized base
    modules live under `.base`, which only exist once the adapters are attached)."""
    from fmkernels.cli import main

    out = tmp_path / "qlora"
    s = train(_cfg(out, pretrained["corpus_b"], init_from=str(pretrained["run"]), lora_rank=4, lora_base=kind,
                   max_steps=3, final_eval=True),
              log=lambda m: None)
    assert s["exit_code"] == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # the run evaluated with the quantized base (int8: activations quantized too); the loaded model merges the
    # adapters into the dequantized base weights: same weights, so within quantization noise of the run's figure
    assert abs(r["val_bpb"] - s["val_bpb"]) < 0.05 * s["val_bpb"]
    assert main(["generate", "--checkpoint", str(out), "--max_new_tokens", "8", "--prompt", "def "]) == 0
    assert capsys.readouterr().out.startswith("def ")
    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(out), "--out_dir", str(merged)]) == 0
    sd = _state(merged)["model"]
    assert not any("lora_" in k or ".base." in k or "packed" in k for k in sd)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(merged), "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["val_bpb"] - r["val_bpb"]) < 1e-4
    s2 = train(_cfg(tmp_path / "again", pretrained["corpus_a"], init_from=str(out), max_steps=2), log=lambda m: None)
    assert s2["exit_code"] == 0 and np.isfinite(s2["final_train_loss"])


# ---------------------------------------------------------------- data augmentation
def test_augment_deterministic_and_effective():
    from fmkernels.data.augment import IGNORE, TokenAugment, augment_batch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 200, (8, 64), generator=g)
    y = torch.roll(x, -1, 1)
    aug = TokenAugment(crop=0.5, token_dropout=0.1, span_mask=0.5, span_len=6, fill_id=0)
    a1 = augment_batch(x, y, aug, np.random.default_rng(3))
    a2 = augment_batch(x, y, aug, np.random.default_rng(3))
    a3 = augment_batch(x, y, aug, np.random.default_rng(4))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])
    assert not torch.equal(a1[0], a3[0])
    assert not torch.equal(a1[0], x)  # it did something
    assert torch.equal(augment_batch(x, y, TokenAugment(), np.random.default_rng(3))[0], x)  # off = untouched
    # crop only: each cropped row is the original shifted left by k, tail ignored
    xc, yc = augment_batch(x, y, TokenAugment(crop=1.0), np.random.default_rng(0))
    for b in range(8):
        k = int((yc[b] == IGNORE).sum())
        assert 1 <= k <= 32
        assert torch.equal(xc[b, : 64 - k], x[b, k:]) and torch.equal(yc[b, : 64 - k], y[b, k:])
    # token dropout leaves targets alone and replaces about p of the inputs
    xd, yd = augment_batch(x, y, TokenAugment(token_dropout=0.3), np.random.default_rng(0))
    assert torch.equal(yd, y)
    frac = (xd != x).float().mean().item()
    assert 0.1 < frac < 0.4
    # span mask: exactly one span of fill tokens per row at p = 1
    xs, _ = augment_batch(x, y, TokenAugment(span_mask=1.0, span_len=6, fill_id=0), np.random.default_rng(0))
    assert ((xs == 0).sum(1) == 6).all()


def test_augment_only_training_batches(pretrained, tmp_path):
    """The switch reaches the loop (the training loss changes) and the validation split is untouched."""
    base = train(_cfg(tmp_path / "a", pretrained["corpus_b"], max_steps=2, final_eval=True), log=lambda m: None)
    aug = train(_cfg(tmp_path / "b", pretrained["corpus_b"], max_steps=2, final_eval=True, aug_token_dropout=0.5,
                     aug_span_mask=1.0), log=lambda m: None)
    r_base, r_aug = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert float(r_base[0]["loss"]) != float(r_aug[0]["loss"])
    from fmkernels.train.trainer import Trainer

    t = Trainer(_cfg(tmp_path / "c", pretrained["corpus_b"], max_steps=1, aug_token_dropout=0.5), log=lambda m: None)
    t.setup()
    before = np.array(t.data.val).copy()
    t.evaluate(None)
    assert np.array_equal(before, np.array(t.data.val))
    assert np.isfinite(aug["val_loss"]) and np.isfinite(base["val_loss"])


def _code_samples():
    from fmkernels.data import stdlib_files

    out = []
    for rel, path in stdlib_files()[:60]:
        if rel.endswith(".py"):
            out.append(path.read_text(encoding="utf-8", errors="replace"))
    return out


def test_rename_identifiers_compiles_and_is_deterministic():
    from fmkernels.data.augment import rename_identifiers

    n_renamed = 0
    for src in _code_samples():
        r1 = rename_identifiers(src, seed=1)
        if r1 is None:
            continue
        compile(r1, "<renamed>", "exec")
        assert r1 == rename_identifiers(src, seed=1)
        n_renamed += r1 != __import__("ast").unparse(__import__("ast").parse(src))
    assert n_renamed >= 5


def test_rename_identifiers_keeps_behaviour():
    from fmkernels.data.augment import rename_identifiers

    src = '''
import math

TOTAL = 10

def f(a, b=2, *rest, key=None, **extra):
    total = a + b
    for i, v in enumerate(rest):
        total += i * v
    try:
        q = 1 / (total - total)
    except ZeroDivisionError as err:
        q = len(str(err))
    def inner(z):
        return z + total
    sq = [w * w for w in range(3)]
    return inner(q) + sum(sq) + len(extra) + (key or 0) + math.floor(TOTAL / 3)

def g(n, /):
    acc = []
    while n > 0:
        acc.append(n)
        n -= 1
    return acc
'''
    out = rename_identifiers(src, seed=0)
    assert out is not None and out != src
    assert "acc" not in out and "err" not in out  # plain locals were renamed
    ns1, ns2 = {}, {}
    exec(compile(src, "a", "exec"), ns1)
    exec(compile(out, "b", "exec"), ns2)
    for args, kw in [((1,), {}), ((1, 3, 4, 5), {"key": 7, "x": 1})]:
        assert ns1["f"](*args, **kw) == ns2["f"](*args, **kw)
    assert ns1["g"](4) == ns2["g"](4)
    assert rename_identifiers("def f(:\n") is None


def test_rename_switch_changes_train_split_only(small_corpus):
    from fmkernels.data import prepare_data

    plain = prepare_data(str(small_corpus), "byte", 4096, 0.1, log=lambda m: None)
    ren = prepare_data(str(small_corpus), "byte", 4096, 0.1, log=lambda m: None, rename_p=1.0, rename_seed=0)
    again = prepare_data(str(small_corpus), "byte", 4096, 0.1, log=lambda m: None, rename_p=1.0, rename_seed=0)
    assert np.array_equal(np.asarray(plain.val), np.asarray(ren.val))  # validation untouched
    assert not np.array_equal(np.asarray(plain.train[: len(ren.train)]), np.asarray(ren.train[: len(plain.train)]))
    assert np.array_equal(np.asarray(ren.train), np.asarray(again.train))  # deterministic
    assert "v_" in bytes(np.asarray(ren.train, dtype=np.uint8)).decode("utf-8", "replace")


def test_augmented_runs_are_reproducible(pretrained, tmp_path):
    kw = dict(max_steps=3, aug_crop=0.5, aug_token_dropout=0.1, aug_span_mask=0.5, aug_rename=0.5)
    a = train(_cfg(tmp_path / "a", pretrained["corpus_b"], **kw), log=lambda m: None)
    b = train(_cfg(tmp_path / "b", pretrained["corpus_b"], **kw), log=lambda m: None)
    assert a["final_train_loss"] == b["final_train_loss"]
    assert [r["loss"] for r in _metrics(tmp_path / "a")] == [r["loss"] for r in _metrics(tmp_path / "b")]
