"""Atomic, verifiable checkpoints that never execute code when loaded.

Layout of one checkpoint, `<out_dir>/checkpoints/step_00000050/`:
  model.safetensors    weights (safetensors)
  optimizer.pt         optimizer state (torch.save; loaded with torch.load(weights_only=True))
  rng.pt               torch CPU (+ CUDA) RNG states (weights_only load)
  state.json           step, tokens seen, data position, scheduler, timings, python RNG state, config
  tokenizer/           the tokenizer the model was trained with
  MANIFEST.json        size + sha256 of every file above; written LAST
Written into `.tmp-step_...` beside the target and renamed when complete: a directory named `step_*` with a
MANIFEST is a complete checkpoint. Replacing a step directory renames the old one aside (`.old-step_...`)
before the new one is renamed in, and deletes it after, so a kill at any instant leaves a complete copy of the
newest state; `recover` (next save, next start) renames an orphaned aside copy back and deletes temporaries.
The last `keep_last` (>= 2) are kept. `load_latest` verifies the manifest and falls back to the previous complete checkpoint when the newest is truncated or corrupted.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..data.tokenizer import load_tokenizer

PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupted; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def ckpt_root(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


# a save being written; a replaced step dir (renamed back if its step dir is missing); a dropped one
TMP, ASIDE, DROP = f".tmp-{PREFIX}", f".old-{PREFIX}", f".drop-{PREFIX}"


def _step_of(name: str, prefix: str) -> Optional[int]:
    digits = name[len(prefix):].split("-")[0]
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None


def list_checkpoints(out_dir) -> list[Path]:
    """Complete-looking checkpoints (named step_*, with a MANIFEST), oldest first. A step directory set aside
    by a save that was killed between its two renames (`.old-step_N-*` with no `step_N`) counts as step N, so
    a read-only reader sees it too; `recover` renames it back."""
    root = ckpt_root(out_dir)
    if not root.exists():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        if not p.is_dir() or not (p / "MANIFEST.json").exists():
            continue
        n = _step_of(p.name, PREFIX)
        if n is not None:
            found[n] = p
    for p in root.iterdir():
        n = _step_of(p.name, ASIDE)
        if n is not None and n not in found and p.is_dir() and (p / "MANIFEST.json").exists():
            found[n] = p
    return [found[n] for n in sorted(found)]


def recover(out_dir) -> None:
    """Clean up after a writer that was killed (next start / next save): an aside copy whose step directory is
    missing is renamed back; other aside copies and every temporary directory are deleted."""
    root = ckpt_root(out_dir)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        n = _step_of(p.name, ASIDE)
        if n is None:
            continue
        final = root / f"{PREFIX}{n:08d}"
        if not final.exists() and (p / "MANIFEST.json").exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in list(root.glob(f"{TMP}*")) + list(root.glob(f"{DROP}*")):
        shutil.rmtree(p, ignore_errors=True)
    _fsync_dir(root)


def describe_os_error(e: OSError, what: str) -> str:
    """One clear sentence for the errors a user can fix (full disk, read-only or unwritable directory)."""
    where = e.filename or what
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: no space left on the device holding {where} (free some space or choose another out_dir)"
    if e.errno == errno.EROFS:
        return f"{what}: {where} is on a read-only file system (choose a writable out_dir)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: permission denied writing {where} (the directory is read-only for this user; choose a writable out_dir)"
    return f"{what}: {type(e).__name__}: {e}"


USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class _DeferSignals:
    """SIGINT / SIGTERM that arrive inside the block are held and delivered to the previous handlers when it
    ends (main thread only: elsewhere Python cannot install handlers and nothing changes)."""

    def __enter__(self):
        self.pending: list[int] = []
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, lambda signum, frame: self.pending.append(signum))
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        for s in self.pending:
            h = self.old[s]
            if callable(h):
                h(s, None)  # e.g. the trainer's handler, or default_int_handler (KeyboardInterrupt)
            elif h == signal.SIG_DFL:
                signal.raise_signal(s)
        return False


def save_checkpoint(out_dir, step: int, model_state: dict, optim_state: dict, state: dict, tokenizer,
                    keep_last: int = 2) -> Path:
    """Write `step_<step>` atomically. At every instant at least one complete copy of the newest checkpoint that
    existed before exists on disk: the new one is written into a temporary directory; a step directory that is
    replaced (same step saved twice) is renamed aside, the new one renamed in, and only then the old one deleted.
    A signal that arrives meanwhile is delivered when the save is complete. A full disk or an unwritable directory
    raises CheckpointError with one clear sentence (the temporary directory is removed; older checkpoints are
    untouched)."""
    root = ckpt_root(out_dir)
    with _DeferSignals():
        try:
            root.mkdir(parents=True, exist_ok=True)
            recover(out_dir)  # leftovers of killed writers, which would also waste the space this save needs
        except OSError as e:
            if e.errno in USER_ERRNOS:
                raise CheckpointError(describe_os_error(e, f"cannot save checkpoint step {step} to {root}")) from None
            raise
        tmp = root / f"{TMP}{step:08d}-{os.getpid()}"
        try:
            final = _save(root, tmp, step, model_state, optim_state, state, tokenizer)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in USER_ERRNOS:
                raise CheckpointError(describe_os_error(e, f"cannot save checkpoint step {step} to {root}")) from None
            if isinstance(e, RuntimeError) and "No space left" in str(e):  # torch.save's writer wraps errno
                raise CheckpointError(describe_os_error(OSError(errno.ENOSPC, "No space left on device", str(tmp)),
                                                        f"cannot save checkpoint step {step} to {root}")) from None
            raise
        for old in list_checkpoints(out_dir)[:-keep_last]:
            aside = root / f"{DROP}{old.name[len(PREFIX):]}-{os.getpid()}"
            try:  # renamed first, so a half-deleted directory is never taken for a checkpoint
                os.replace(old, aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    return final


def _save(root: Path, tmp: Path, step: int, model_state, optim_state, state, tokenizer) -> Path:
    final = root / f"{PREFIX}{step:08d}"
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(optim_state, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    tokenizer.save(tmp / "tokenizer")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / "MANIFEST.json").write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    with open(tmp / "MANIFEST.json", "rb+") as f:
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    aside = None
    if final.exists():  # same step saved again (e.g. signal right after a periodic save): set it aside first
        aside = root / f"{ASIDE}{step:08d}-{os.getpid()}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def verify_checkpoint(path: Path, only: Optional[tuple] = None) -> dict:
    """Sizes and sha256 of the files in the manifest (those under the top-level names in `only`, if given)."""
    mpath = path / "MANIFEST.json"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: {mpath} is unreadable or corrupted ({e})") from e
    for rel, info in files.items():
        if only is not None and Path(rel).parts[0] not in only:
            continue
        p = path / rel
        if not p.exists():
            raise CheckpointError(f"checkpoint {path}: file {p} is missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: file {p} is truncated or changed ({size} bytes, expected {info['bytes']})")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {p} is corrupted (sha256 mismatch)")
    return manifest


def load_checkpoint(path, training_state: bool = True) -> dict:
    """Verify and load one checkpoint: {model, optimizer, rng, state, tokenizer, path}. training_state=False
    (evaluation, generation) verifies and loads the weights, state.json and tokenizer only (optimizer and rng
    are None)."""
    path = Path(path)
    verify_checkpoint(path, None if training_state else ("model.safetensors", "state.json", "tokenizer"))

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:  # verified bytes but unloadable: still name the file
            raise CheckpointError(f"checkpoint {path}: cannot load {path / name} ({type(e).__name__}: {e})") from e

    return {
        "model": guarded("model.safetensors", lambda: load_file(str(path / "model.safetensors"))),
        "optimizer": guarded("optimizer.pt", lambda: torch.load(path / "optimizer.pt", weights_only=True))
        if training_state else None,
        "rng": guarded("rng.pt", lambda: torch.load(path / "rng.pt", weights_only=True)) if training_state else None,
        "state": guarded("state.json", lambda: json.loads((path / "state.json").read_text())),
        "tokenizer": guarded("tokenizer", lambda: load_tokenizer(path / "tokenizer")),
        "path": path,
    }


def load_weights(path_or_dir, log=None) -> dict:
    """For `fmk eval` / `fmk generate`: load_checkpoint(training_state=False) of a checkpoint directory, or of the
    newest checkpoint of a run directory that verifies (older ones are tried when newer ones are corrupted, as
    --resume does)."""
    p = Path(path_or_dir)
    if (p / "MANIFEST.json").exists():
        return load_checkpoint(p, training_state=False)
    return load_latest(p, log=log, training_state=False) or load_checkpoint(resolve_checkpoint(p), False)


def load_latest(out_dir, log=print, training_state: bool = True) -> Optional[dict]:
    """The newest checkpoint that verifies; older ones are tried when newer ones are corrupted."""
    cks = list_checkpoints(out_dir)
    for p in reversed(cks):
        try:
            return load_checkpoint(p, training_state)
        except CheckpointError as e:
            msg = f"{e}; falling back to the previous complete checkpoint"
            if log is not None:
                log(f"WARNING: {msg}")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if cks:
        raise CheckpointError(f"no usable checkpoint in {ckpt_root(out_dir)}: all {len(cks)} failed verification")
    return None


def resolve_checkpoint(path_or_dir) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    p = Path(path_or_dir)
    if (p / "MANIFEST.json").exists():
        return p
    cks = list_checkpoints(p)
    if not cks:
        raise CheckpointError(f"no checkpoint found at {p} (expected a run directory or a checkpoint directory)")
    return cks[-1]
