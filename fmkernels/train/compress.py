"""Compress, then recover: `fmk prune` / `fmk quantize` apply `sparsify_` / `quantize_` to a checkpoint (one-shot,
calibration batches from the checkpoint's corpus), evaluate it, and optionally fine-tune to recover with the one
training loop (2:4: `sparsity="2:4"`, the kept pattern re-derived from the pruned zeros and checked unchanged
afterwards; int8 / int4: `qat=...`, fake quantization, then converted), writing a checkpoint that `fmk eval`,
`fmk generate` and `fmk finetune --from` load directly.

A compressed checkpoint stores the compressed modules' own state (SparseLinear values + meta, Int8Linear /
Int4Linear packed weights + scales) in model.safetensors; `build_model` rebuilds that structure from the state
dict keys (plus state.json "compress" for what the keys do not say: int4 symmetric / act_terms), so the fast
kernels run at evaluation. `densify` turns such a model back into plain nn.Linear layers (for fine-tuning).

Layout of `--out_dir P`: P/checkpoints/ holds the result (one-shot, or recovered when --recover_steps > 0);
with recovery, the one-shot checkpoint is kept in P/oneshot/ and (quantize) the QAT run in P/qat/.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..data import BatchSampler, prepare_data
from ..models.config import ConfigError
from ..nn.linear import is_dense_linear
from ..quantization import Int4WeightOnlyConfig, Int8DynamicConfig, quantize_
from ..reference.quant import INT4_GROUP_SIZES
from ..sparsity import SemiStructuredConfig, sparsify_
from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .converters import apply_qat  # noqa: F401
from .evaluate import evaluate_checkpoint
from .model_source import (_set, apply_structure, build_model, compressed_modules, densify,  # noqa: F401
                           is_compressed, load_pretrained)
from .trainer import train

FORMATS = ("int8", "int4")
PRUNE_METHODS = ("wanda", "magnitude")


# ---------------------------------------------------------------------------------------------------- helpers
def _load_source(path) -> dict:
    pre = load_pretrained(path)
    ck = pre["checkpoint"]
    if is_compressed(ck["model"]):
        raise ConfigError(f"checkpoint {pre['path']} is already compressed "
                          f"({sorted(set(compressed_modules(ck['model']).values()))}); start from a dense checkpoint")
    return pre


def _data_for(pre: dict, log):
    cfg = pre["checkpoint"]["state"]["config"]
    tok = pre["checkpoint"]["tokenizer"]
    return prepare_data(cfg["corpus"], tok.kind, tok.vocab_size, cfg["val_fraction"], cfg.get("stdlib_tests", False),
                        cfg.get("text_field", "text"), log=log, tokenizer_dir=str(pre["tokenizer_dir"]))


def calibration_batches(data, seq_len: int, n_batches: int, batch_size: int, seed: int = 0) -> list:
    """n_batches (batch_size, seq_len) token batches from the training split (step-keyed, as in training)."""
    s = BatchSampler(data.train, seq_len, batch_size, seed=seed + 0xCA1)
    return [s.batch(i)[0] for i in range(n_batches)]


def _check_out(out_dir) -> Path:
    out = Path(out_dir)
    if list_checkpoints(out) or (out / "oneshot").exists():
        raise ConfigError(f"out_dir {str(out)!r} already holds checkpoints; choose another out_dir")
    return out


def _save(out: Path, pre: dict, model: nn.Module, compress: dict) -> Path:
    ck = pre["checkpoint"]
    state = dict(ck["state"])
    cfg = dict(state.get("config", {}))
    cfg.update(out_dir=str(out), lora_rank=0, lora_base="dense", qat=None)
    state.update(config=cfg, compress=compress)
    return save_checkpoint(out, int(state.get("step", 0)), model.state_dict(), {}, state, ck["tokenizer"])


def _check_common(calib_batches: int, recover_steps: int, eval_tokens: Optional[int]) -> None:
    if not isinstance(calib_batches, int) or calib_batches < 1:
        raise ConfigError(f"calib_batches must be a positive integer, got {calib_batches!r}")
    if not isinstance(recover_steps, int) or recover_steps < 0:
        raise ConfigError(f"recover_steps must be an integer >= 0 (0: no recovery), got {recover_steps!r}")
    if eval_tokens is not None and (not isinstance(eval_tokens, int) or eval_tokens < 1):
        raise ConfigError(f"eval_tokens must be a positive integer or None (the full validation split), got {eval_tokens!r}")


def _recover(src_ckpt: Path, out: Path, pre: dict, recover_steps: int, overrides: dict, log) -> dict:
    """Fine-tune from src_ckpt into `out` with the one training loop; returns the run's summary."""
    cfg0 = pre["checkpoint"]["state"]["config"]
    fields = dict(init_from=str(src_ckpt), corpus=cfg0["corpus"], stdlib_tests=cfg0.get("stdlib_tests", False),
                  text_field=cfg0.get("text_field", "text"), val_fraction=cfg0["val_fraction"],
                  seq_len=pre["model_config"].max_seq_len, batch_size=cfg0.get("batch_size", 16),
                  dtype=cfg0.get("dtype", "auto"), max_steps=recover_steps, lr=3e-4, warmup_steps=min(10, recover_steps),
                  min_lr_ratio=0.1, lr_schedule="cosine", out_dir=str(out), sample_tokens=0, final_eval=False,
                  eval_every=1_000_000,
                  save_every=1_000_000, log_every=max(1, recover_steps // 10), progress=False, seed=cfg0.get("seed", 0))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return train(TrainConfig.build(None, fields), log=log)


def _eval(path, eval_tokens, batch_size) -> dict:
    return evaluate_checkpoint(path, max_tokens=eval_tokens, batch_size=batch_size)


def format_table(rows: list[dict]) -> str:
    """Markdown table of {name, val_bpb, val_loss, tokens_per_s, checkpoint} rows (ratios vs the first row)."""
    base = rows[0]
    lines = ["| model | val bits/byte | val loss | eval tokens/s | vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['val_bpb']:.4f} | {r['val_loss']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- commands
def prune_checkpoint(path, out_dir, method: str = "wanda", calib_batches: int = 8, recover_steps: int = 0,
                     eval_tokens: Optional[int] = None, eval_batch_size: int = 16, log=print,
                     **train_overrides) -> list[dict]:
    """2:4-prune a dense checkpoint into out_dir (one-shot; recovered when recover_steps > 0); returns the table
    rows (dense, 2:4 one-shot[, 2:4 after recovery])."""
    if method not in PRUNE_METHODS:
        raise ConfigError(f"method must be one of {PRUNE_METHODS}, got {method!r}")
    _check_common(calib_batches, recover_steps, eval_tokens)
    out = _check_out(out_dir)
    pre = _load_source(path)
    rows = [dict(name="dense", **_eval(pre["path"], eval_tokens, eval_batch_size))]
    model = build_model(pre["model_config"], pre["model"])
    seq_len = pre["model_config"].max_seq_len
    calib = None
    if method == "wanda":
        data = _data_for(pre, log)
        calib = calibration_batches(data, seq_len, calib_batches, 8)
    t0 = time.perf_counter()
    sparsify_(model, SemiStructuredConfig(method=method), calibration=calib)
    spec = dict(kind="2:4", method=method, calib_batches=calib_batches if calib else 0, source=str(pre["path"]))
    n = len(compressed_modules(model.state_dict()))
    log(f"fmk prune: 2:4 {method} on {n} linear layers in {time.perf_counter() - t0:.1f} s")
    if recover_steps == 0:
        p = _save(out, pre, model, spec)
        rows.append(dict(name=f"2:4 one-shot ({method})", **_eval(p, eval_tokens, eval_batch_size)))
        _write_rows(out, rows)
        return rows
    tmp = Path(tempfile.mkdtemp(prefix=".fmk-prune-", dir=out.parent if out.parent.exists() else None))
    try:
        p1 = _save(tmp, pre, model, spec)
        rows.append(dict(name=f"2:4 one-shot ({method})", **_eval(p1, eval_tokens, eval_batch_size)))
        meta0 = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".meta")}
        _recover(p1, out, pre, recover_steps, dict(train_overrides, sparsity="2:4"), log)
        final = resolve_checkpoint(out)
        sd = load_checkpoint(final)["model"]
        changed = [k for k, v in meta0.items() if k not in sd or not torch.equal(sd[k], v)]
        if changed:
            raise RuntimeError(f"fmk prune: the 2:4 pattern changed during recovery in {changed[:3]}")
        log(f"fmk prune: recovery kept the one-shot 2:4 pattern of all {len(meta0)} layers")
        rows.append(dict(name=f"2:4 after {recover_steps} recovery steps", **_eval(final, eval_tokens, eval_batch_size)))
        shutil.move(str(tmp), str(out / "oneshot"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_rows(out, rows)
    return rows


def quantize_checkpoint(path, out_dir, format: str = "int8", group_size: int = 128, recover_steps: int = 0,
                        eval_tokens: Optional[int] = None, eval_batch_size: int = 16, log=print,
                        **train_overrides) -> list[dict]:
    """int8 (W8A8) or int4 weight-only (group_size) quantization of a dense checkpoint into out_dir; with
    recover_steps > 0, QAT fine-tuning first (from the dense weights), then conversion. Returns the table rows."""
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")

    if format == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    _check_common(1, recover_steps, eval_tokens)
    out = _check_out(out_dir)
    pre = _load_source(path)
    qcfg = Int8DynamicConfig() if format == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    name = "int8 (W8A8)" if format == "int8" else f"int4 g{group_size}"
    spec = dict(kind=format, group_size=group_size if format == "int4" else None, symmetric=False, act_terms=2,
                source=str(pre["path"]))

    def convert(sd) -> nn.Module:
        m = build_model(pre["model_config"], sd)
        quantize_(m, qcfg)
        n = len(compressed_modules(m.state_dict()))
        n_lin = n + sum(is_dense_linear(x) for x in m.modules())
        log(f"fmk quantize: {name} on {n} of {n_lin} linear layers (the others do not fit the format)")
        if n == 0:
            raise ConfigError(f"format {format!r}: no linear layer of this model fits {name} (group_size must divide "
                              f"in_features)")
        return m

    rows = [dict(name="dense", **_eval(pre["path"], eval_tokens, eval_batch_size))]
    model = convert(pre["model"])
    if recover_steps == 0:
        p = _save(out, pre, model, spec)
        rows.append(dict(name=f"{name} one-shot", **_eval(p, eval_tokens, eval_batch_size)))
        _write_rows(out, rows)
        return rows
    tmp = Path(tempfile.mkdtemp(prefix=".fmk-quant-", dir=out.parent if out.parent.exists() else None))
    try:
        p1 = _save(tmp / "oneshot", pre, model, spec)
        rows.append(dict(name=f"{name} one-shot", **_eval(p1, eval_tokens, eval_batch_size)))
        _recover(pre["path"], tmp / "qat", pre, recover_steps,
                 dict(train_overrides, qat=format, qat_group_size=group_size), log)
        qat_sd = load_checkpoint(resolve_checkpoint(tmp / "qat"))["model"]
        p = _save(out, pre, convert(qat_sd), dict(spec, qat_steps=recover_steps))
        rows.append(dict(name=f"{name} after {recover_steps} QAT steps", **_eval(p, eval_tokens, eval_batch_size)))
        for sub in ("oneshot", "qat"):
            shutil.move(str(tmp / sub), str(out / sub))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_rows(out, rows)
    return rows


def _write_rows(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress.json").write_text(json.dumps(rows, indent=1, default=str))
