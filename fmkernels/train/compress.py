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

from ..models import Transformer, TransformerConfig
from ..nn.linear import is_dense_linear
from ..models.config import ConfigError
from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint

FORMATS = ("int8", "int4")
PRUNE_METHODS = ("wanda", "magnitude")


# ---------------------------------------------------------------------------------------------------- structure
def compressed_modules(sd: dict) -> dict:
    """{module fqn: "2:4" | "int8" | "int4"} for every compressed module whose state is in the state dict."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".meta") and k[: -len(".meta")] + ".values" in sd:
            out[k[: -len(".meta")]] = "2:4"
        elif k.endswith(".weight_packed"):
            out[k[: -len(".weight_packed")]] = "int8" if v.dtype == torch.int8 else "int4"
    return out


def is_compressed(sd: dict) -> bool:
    return bool(compressed_modules(sd))


def _set(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_structure(model: nn.Module, sd: dict, spec: Optional[dict] = None) -> nn.Module:
    """Replace the nn.Linear layers that hold compressed state in `sd` by empty compressed modules of that format
    (load_state_dict then fills them)."""
    from ..nn.quantized import Int4Linear, Int8Linear
    from ..nn.sparse import SparseLinear

    spec = spec or {}
    for fqn, kind in compressed_modules(sd).items():
        try:
            lin = model.get_submodule(fqn)
        except AttributeError:
            raise ConfigError(f"checkpoint: compressed module {fqn!r} does not exist in the model") from None
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"checkpoint: compressed module {fqn!r} is a {type(lin).__name__}, not an nn.Linear")
        bias = f"{fqn}.bias" in sd
        K, N = lin.in_features, lin.out_features
        if kind == "2:4":
            new = SparseLinear(K, N, bias, format="2:4")
        elif kind == "int8":
            new = Int8Linear(K, N, bias)
        else:
            G = sd[f"{fqn}.weight_scale"].shape[0]  # groups over K padded to the group size
            gs = spec.get("group_size") or next((g for g in (32, 64, 128, 256) if -(-K // g) == G), K // G)
            new = Int4Linear(K, N, bias, group_size=gs, symmetric=bool(spec.get("symmetric", False)),
                             act_terms=int(spec.get("act_terms", 2)))
        _set(model, fqn, new)
    return model


def build_model(mcfg: TransformerConfig, sd: dict, spec: Optional[dict] = None) -> Transformer:
    """A Transformer with the structure (dense or compressed) of `sd`, loaded from it, in eval mode."""
    model = apply_structure(Transformer(mcfg), sd, spec)
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Every SparseLinear / Int8Linear / Int4Linear -> nn.Linear holding its (dequantized) dense weight."""
    from ..nn.quantized import Int4Linear, Int8Linear
    from ..nn.sparse import SparseLinear

    for fqn, m in list(model.named_modules()):
        if isinstance(m, SparseLinear):
            _set(model, fqn, m.to_dense())
        elif isinstance(m, (Int8Linear, Int4Linear)):
            w = m.dequantized_weight()[: m.out_features, : m.in_features].float()
            lin = nn.Linear(m.in_features, m.out_features, m.bias is not None)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            _set(model, fqn, lin)
    return model


def apply_qat(model: nn.Module, kind: str, group_size: int = 128) -> int:
    """prepare_qat_ on every nn.Linear the format takes (the trainer's `qat` switch); returns how many."""
    from ..nn.quantized import QATLinear
    from ..quantization import Int4WeightOnlyConfig, Int8DynamicConfig, prepare_qat_

    cfg = Int8DynamicConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    prepare_qat_(model, cfg)
    n = sum(isinstance(m, QATLinear) for m in model.modules())
    if n == 0:
        raise ConfigError(f"config: qat={kind!r} found no linear layer it can quantize (group_size {group_size})")
    return n


# ---------------------------------------------------------------------------------------------------- helpers
def _load_source(path) -> dict:
    from .finetune import load_pretrained

    pre = load_pretrained(path)
    ck = pre["checkpoint"]
    if is_compressed(ck["model"]):
        raise ConfigError(f"checkpoint {pre['path']} is already compressed "
                          f"({sorted(set(compressed_modules(ck['model']).values()))}); start from a dense checkpoint")
    return pre


def _data_for(pre: dict, log):
    from ..data import prepare_data

    cfg = pre["checkpoint"]["state"]["config"]
    tok = pre["checkpoint"]["tokenizer"]
    return prepare_data(cfg["corpus"], tok.kind, tok.vocab_size, cfg["val_fraction"], cfg.get("stdlib_tests", False),
                        cfg.get("text_field", "text"), log=log, tokenizer_dir=str(pre["tokenizer_dir"]))


def calibration_batches(data, seq_len: int, n_batches: int, batch_size: int, seed: int = 0) -> list:
    """n_batches (batch_size, seq_len) token batches from the training split (step-keyed, as in training)."""
    from ..data import BatchSampler

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
    from .config import TrainConfig
    from .trainer import train

    cfg0 = pre["checkpoint"]["state"]["config"]
    fields = dict(init_from=str(src_ckpt), corpus=cfg0["corpus"], stdlib_tests=cfg0.get("stdlib_tests", False),
                  text_field=cfg0.get("text_field", "text"), val_fraction=cfg0["val_fraction"],
                  seq_len=pre["model_config"].max_seq_len, batch_size=cfg0.get("batch_size", 16),
                  dtype=cfg0.get("dtype", "auto"), max_steps=recover_steps, lr=3e-4, warmup_steps=min(10, recover_steps),
                  min_lr_ratio=0.1, out_dir=str(out), sample_tokens=0, final_eval=False, eval_every=1_000_000,
                  save_every=1_000_000, log_every=max(1, recover_steps // 10), progress=False, seed=cfg0.get("seed", 0))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return train(TrainConfig.build(None, fields), log=log)


def _eval(path, eval_tokens, batch_size) -> dict:
    from .evaluate import evaluate_checkpoint

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
    import fmkernels as fk

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
    fk.sparsify_(model, fk.SemiStructuredConfig(method=method), calibration=calib)
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
    import fmkernels as fk

    if format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
    from ..reference.quant import INT4_GROUP_SIZES

    if format == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    _check_common(1, recover_steps, eval_tokens)
    out = _check_out(out_dir)
    pre = _load_source(path)
    qcfg = fk.Int8DynamicConfig() if format == "int8" else fk.Int4WeightOnlyConfig(group_size=group_size)
    name = "int8 (W8A8)" if format == "int8" else f"int4 g{group_size}"
    spec = dict(kind=format, group_size=group_size if format == "int4" else None, symmetric=False, act_terms=2,
                source=str(pre["path"]))

    def convert(sd) -> nn.Module:
        m = build_model(pre["model_config"], sd)
        fk.quantize_(m, qcfg)
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
