"""Where a run writes: a directory that holds an earlier run is never deleted (issue 15, bug 3).

- `--resume`: the directory is used as it is (the run continues there);
- the default out_dir (`runs/default`, what `make train` uses) holding a run: this run goes to the first free
  sibling `runs/default-2`, `runs/default-3`, ... and says so (the earlier run is kept untouched);
- an out_dir the user chose that holds a run: refused (the trainer's ConfigError: --resume, or another out_dir).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

from ..models.config import ConfigError

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


def run_out_dir(cfg, default_out_dir: str):
    """(cfg with the directory this run writes to, the note of choose_out_dir or None)."""
    out_dir, note = choose_out_dir(cfg.out_dir, default_out_dir, cfg.resume)
    return (cfg if out_dir == cfg.out_dir else dataclasses.replace(cfg, out_dir=out_dir)), note


def check_out_dir(cfg, out: Path, is_main: bool, note: Optional[str], log: Callable[[str], None]) -> None:
    """A fresh run never mixes with an old one, and never deletes it (the default out_dir moved to a free sibling
    by choose_out_dir; any other out_dir holding a run is refused). note: choose_out_dir's note."""
    if note:  # the directory is new: nothing to refuse below
        log(note)
    if cfg.init_from:
        src, dst = Path(cfg.init_from).resolve(), Path(out).resolve()
        if src == dst or dst in src.parents:
            raise ConfigError(f"config: out_dir {cfg.out_dir!r} holds the checkpoint given to --from / init_from "
                              f"({cfg.init_from!r}); fine-tune into another out_dir")
    if cfg.resume or not is_main or note or not holds_run(out):
        return
    raise ConfigError(f"config: out_dir {cfg.out_dir!r} already holds a run; pass --resume to continue it "
                      f"or choose another out_dir")


def finished_reason(max_steps: int, max_time_s: Optional[float], step: int, train_time_s: float) -> Optional[str]:
    """Why a run resumed at (step, train_time_s) has nothing left to do, or None."""
    if max_time_s is not None and train_time_s >= max_time_s:
        return f"its training budget max_time_s={max_time_s:g} is spent ({train_time_s:.0f} s, step {step})"
    if step >= max_steps:
        return f"it reached max_steps={max_steps} (step {step})"
    return None


def previous_summary(out_dir) -> Optional[dict]:
    """summary.json of a run that ended normally (exit code 0), else None."""
    p = Path(out_dir) / "summary.json"
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("exit_code", 1) == 0 else None


def as_trained(cfg, mcfg, tokenizer, source_config: Optional[dict] = None):
    """A fine-tune's TrainConfig with the fields that describe the model and tokenizer set from what was built
    (the checkpoint's architecture and tokenizer): state.json, the log line and the plot title then say
    "tiny, byte" for a tiny byte-level model instead of this run's defaults ("small, bpe"). The model fields are
    the config fields the model config also has (dim, n_layers, ..., vocab_size)."""
    kw = {f.name: getattr(mcfg, f.name) for f in dataclasses.fields(cfg) if hasattr(mcfg, f.name)}
    kind = getattr(tokenizer, "kind", cfg.tokenizer)
    kw.update(tokenizer=kind, vocab_size=int(tokenizer.vocab_size))
    preset = (source_config or {}).get("preset")
    if preset:
        kw["preset"] = preset
    return dataclasses.replace(cfg, **kw)


def finished_run(cfg, out, step: int, train_time_s: float, log) -> Optional[dict]:
    """--resume of a run that ended normally and has nothing left to do: say so, touch nothing, return its summary
    (no second final eval, no duplicate metrics row, no NaN train loss); None when there is training left."""
    why = finished_reason(cfg.max_steps, cfg.max_time_s, step, train_time_s)
    prev = previous_summary(out) if why else None
    if prev is None:
        return None
    log(f"--resume: the run in {out} is already finished: {why}. Nothing to do; raise --max_steps "
        f"(or --max_time_s) to train further. Its summary: {Path(out) / 'summary.json'}")
    return dict(prev, already_finished=True)
