"""Where a run writes: a directory that holds an earlier run is never deleted (issue 15, bug 3).

- `--resume`: the directory is used as it is (the run continues there);
- the default out_dir (`runs/default`, what `make train` uses) holding a run: this run goes to the first free
  sibling `runs/default-2`, `runs/default-3`, ... and says so (the earlier run is kept untouched);
- an out_dir the user chose that holds a run: refused (the trainer's ConfigError: --resume, or another out_dir).
"""
from __future__ import annotations

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
