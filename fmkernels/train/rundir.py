"""Where a run writes: a directory that holds an earlier run is never deleted (issue 15, bug 3).

- `--resume`: the directory is used as it is (the run continues there);
- the default out_dir (`runs/default`, what `make train` uses) holding a run: this run goes to the first free
  sibling `runs/default-2`, `runs/default-3`, ... and says so (the earlier run is kept untouched);
- an out_dir the user chose that holds a run: refused (the trainer's ConfigError: --resume, or another out_dir).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

# what makes a directory "a run" (files the trainer writes; a bare directory or unrelated files do not count)
RUN_MARKERS = ("checkpoints", "metrics.csv", "summary.json")


def holds_run(path) -> bool:
    p = Path(path)
    return any((p / m).exists() for m in RUN_MARKERS)


def free_sibling(path) -> Path:
    """`path` itself when it holds no run, else the first `path-N` (N = 2, 3, ...) that holds none."""
    p = Path(path)
    if not holds_run(p):
        return p
    n = 2
    while holds_run(p.with_name(f"{p.name}-{n}")):
        n += 1
    return p.with_name(f"{p.name}-{n}")


def choose_out_dir(out_dir: str, default_out_dir: str, resume: bool) -> tuple[str, Optional[str]]:
    """(the directory this run writes to, a note for the log or None). Only the default out_dir is moved; any
    other out_dir is returned as given (the trainer refuses it when it holds a run and resume is off)."""
    if resume or out_dir != default_out_dir or not holds_run(out_dir):
        return out_dir, None
    new = str(free_sibling(out_dir))
    return new, (f"{out_dir} holds an earlier run (kept untouched); this run writes to {new} "
                 f"(--resume continues {out_dir}; --out_dir picks a directory)")


def finished_reason(max_steps: int, max_time_s: Optional[float], step: int, train_time_s: float) -> Optional[str]:
    """Why a run resumed at (step, train_time_s) has nothing left to do, or None."""
    if max_time_s is not None and train_time_s >= max_time_s:
        return f"its training budget max_time_s={max_time_s:g} is spent ({train_time_s:.0f} s, step {step})"
    if step >= max_steps:
        return f"it reached max_steps={max_steps} (step {step})"
    return None


def previous_summary(out_dir) -> Optional[dict]:
    """summary.json of a run that ended normally (exit code 0), else None."""
    import json

    p = Path(out_dir) / "summary.json"
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("exit_code", 1) == 0 else None


def as_trained(cfg, mcfg, tokenizer, source_config: Optional[dict] = None):
    """A fine-tune's TrainConfig with the fields that describe the model and tokenizer set from what was built
    (the checkpoint's architecture and tokenizer): state.json, the log line and the plot title then say
    "tiny, byte" for a tiny byte-level model instead of this run's defaults ("small, bpe")."""
    import dataclasses

    from .config import MODEL_FIELDS

    kw = {k: getattr(mcfg, k) for k in MODEL_FIELDS if hasattr(mcfg, k)}
    kind = getattr(tokenizer, "kind", cfg.tokenizer)
    kw.update(tokenizer=kind, vocab_size=int(tokenizer.vocab_size))
    preset = (source_config or {}).get("preset")
    if preset:
        kw["preset"] = preset
    return dataclasses.replace(cfg, **kw)
