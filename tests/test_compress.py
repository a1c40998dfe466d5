"""Compress, then recover (fmk prune / fmk quantize): the pruned checkpoint keeps its 2:4 pattern through recovery
steps, compressed checkpoints load in fmk eval / fmk generate with their compressed layers, bad arguments raise
errors naming them. Tiny model, byte tokenizer, a few steps."""
import json

import pytest
import torch
from torch import nn

from fmkernels.models.config import ConfigError
from fmkernels.nn.quantized import Int4Linear, Int8Linear
from fmkernels.nn.sparse import SparseLinear
from fmkernels.train import TrainConfig, train
from fmkernels.train import checkpoint as ckpt
from fmkernels.train.compress import (build_model, compressed_modules, densify, prune_checkpoint,
                                      quantize_checkpoint)
from fmkernels.train.evaluate import load_model

# tiny preset with dim 128 (ffn 384): every block linear takes 2:4 and int4 g64
TINY = dict(preset="tiny", dim=128, tokenizer="byte", seq_len=32, batch_size=4, progress=False, sample_tokens=0,
            eval_every=1000, log_every=1, final_eval=False, warmup_steps=0, lr=3e-3, dtype="fp32")
EVAL = dict(eval_tokens=512, log=lambda m: None)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from fmkernels.data import stdlib_files

    root = tmp_path_factory.mktemp("cmp")
    c = root / "corpus"
    c.mkdir()
    for rel, path in stdlib_files()[:12]:
        (c / rel.replace("/", "__")).write_bytes(path.read_bytes())
    s = train(TrainConfig.build(None, dict(TINY, corpus=str(c), out_dir=str(root / "pre"), max_steps=6)),
              log=lambda m: None)
    assert s["exit_code"] == 0
    return root / "pre"


def _sd(run):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(run)[-1])["model"]


def test_prune_recovery_keeps_the_24_pattern_and_changes_the_weights(dense, tmp_path):
    out = tmp_path / "pruned"
    rows = prune_checkpoint(dense, out, method="wanda", calib_batches=2, recover_steps=3, batch_size=4, **EVAL)
    assert [r["name"].split(" (")[0] for r in rows] == ["dense", "2:4 one-shot", "2:4 after 3 recovery steps"]
    one = ckpt.load_checkpoint(ckpt.list_checkpoints(out / "oneshot")[-1])["model"]
    rec = _sd(out)
    mods = compressed_modules(rec)
    assert len(mods) == 8 and set(mods.values()) == {"2:4"}  # 2 layers x wqkv, wo, w13, w2
    for m in mods:
        assert torch.equal(rec[m + ".meta"], one[m + ".meta"])  # same kept positions
        assert not torch.equal(rec[m + ".values"], one[m + ".values"])  # the recovery steps trained them
    model, _, _ = load_model(out)
    n24 = 0
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            w = mod.dense_weight().reshape(mod.out_features, -1, 4)
            assert int((w != 0).sum(-1).max()) <= 2
            n24 += 1
    assert n24 == 8
    assert json.loads((out / "compress.json").read_text())[2]["val_bpb"] == rows[2]["val_bpb"]


def test_quantized_checkpoints_load_in_fmk_eval_and_generate(dense, tmp_path, capsys):
    from fmkernels.cli import main

    for fmt, gs, cls in (("int8", 128, Int8Linear), ("int4", 64, Int4Linear)):
        out = tmp_path / fmt
        rows = quantize_checkpoint(dense, out, format=fmt, group_size=gs, **EVAL)
        model, tok, _ = load_model(out)
        assert sum(isinstance(m, cls) for m in model.modules()) == 8
        assert not any(type(m) is nn.Linear for m in model.modules())
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(out), "--max_tokens", "512", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["val_bpb"] == pytest.approx(rows[1]["val_bpb"], rel=1e-6)
        assert rows[1]["val_bpb"] != rows[0]["val_bpb"]  # the quantized model is not the dense one
        assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max_new_tokens", "5"]) == 0
        assert capsys.readouterr().out.startswith("def ")


def test_qat_recovery_writes_a_quantized_checkpoint(dense, tmp_path):
    out = tmp_path / "q"
    rows = quantize_checkpoint(dense, out, format="int8", recover_steps=2, batch_size=4, **EVAL)
    assert rows[-1]["name"] == "int8 (W8A8) after 2 QAT steps"
    assert set(compressed_modules(_sd(out)).values()) == {"int8"}
    qat = ckpt.load_checkpoint(ckpt.list_checkpoints(out / "qat")[-1])
    assert qat["state"]["config"]["qat"] == "int8" and not compressed_modules(qat["model"])
    assert (out / "oneshot").is_dir()


def test_finetune_from_a_compressed_checkpoint_gets_dense_weights(dense, tmp_path):
    from fmkernels.train.finetune import load_pretrained

    out = tmp_path / "p"
    prune_checkpoint(dense, out, method="magnitude", **EVAL)
    pre = load_pretrained(out)
    assert not compressed_modules(pre["model"])
    w = pre["model"]["layers.0.mlp.w13.weight"]
    assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    m = densify(build_model(pre["model_config"], _sd(out)))
    assert all(type(x) is not SparseLinear for x in m.modules())


def test_bad_arguments_raise_clear_errors(dense, tmp_path):
    with pytest.raises(ConfigError, match="method"):
        prune_checkpoint(dense, tmp_path / "a", method="random", **EVAL)
    with pytest.raises(ConfigError, match="calib_batches"):
        prune_checkpoint(dense, tmp_path / "a", calib_batches=0, **EVAL)
    with pytest.raises(ConfigError, match="recover_steps"):
        prune_checkpoint(dense, tmp_path / "a", recover_steps=-1, **EVAL)
    with pytest.raises(ConfigError, match="format"):
        quantize_checkpoint(dense, tmp_path / "a", format="int3", **EVAL)
    with pytest.raises(ConfigError, match="group_size"):
        quantize_checkpoint(dense, tmp_path / "a", format="int4", group_size=48, **EVAL)
    # in_features 128, 384 with group 256: padded to 256, 512 (issue 19), and the padded layers load back
    quantize_checkpoint(dense, tmp_path / "b", format="int4", group_size=256, **EVAL)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        quantize_checkpoint(tmp_path / "nowhere", tmp_path / "a", **EVAL)
    q = tmp_path / "q"
    quantize_checkpoint(dense, q, **EVAL)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        quantize_checkpoint(dense, q, **EVAL)
    with pytest.raises(ConfigError, match="already compressed"):
        prune_checkpoint(q, tmp_path / "c", **EVAL)


def test_cli_prune_prints_the_table_and_rejects_bad_flags(dense, tmp_path, capsys):
    from fmkernels.cli import main

    out = tmp_path / "cli"
    assert main(["prune", "--checkpoint", str(dense), "--out_dir", str(out), "--method", "magnitude",
                 "--eval_tokens", "512"]) == 0
    text = capsys.readouterr().out
    assert "| dense |" in text and "| 2:4 one-shot (magnitude) |" in text
    assert main(["quantize", "--checkpoint", str(dense), "--out_dir", str(tmp_path / "z"), "--format", "int4",
                 "--group_size", "48"]) == 2
    assert "group_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--checkpoint", str(dense), "--out_dir", str(tmp_path / "z"), "--format", "int2"])
