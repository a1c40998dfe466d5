"""Atomic, verifiable checkpoints that never execute code when loaded.

Layout of one checkpoint, `<out_dir>/checkpoints/step_00000050/`:
  model.safetensors    weights (safetensors)
  optimizer.pt         optimizer state (torch.save; loaded with torch.load(weights_only=True))
  rng.pt               torch CPU (+ CUDA) RNG states (weights_only load)
  state.json           step, tokens seen, data position, scheduler, timings, python RNG state, config
  tokenizer/           the tokenizer the model was trained with
  MANIFEST.json        size + sha256 of every file above; written LAST
Written into `.tmp-step_...` beside the target and renamed when complete: a directory named `step_*` with a
MANIFEST is a complete checkpoint. The last `keep_last` (>= 2) are kept. `load_latest` verifies the
manifest and falls back to the previous complete checkpoint when the newest is truncated or corrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def list_checkpoints(out_dir) -> list[Path]:
    """Complete-looking checkpoints (named step_*, with a MANIFEST), oldest first."""
    root = ckpt_root(out_dir)
    if not root.exists():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "MANIFEST.json").exists()]
    return sorted(out, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(out_dir, step: int, model_state: dict, optim_state: dict, state: dict, tokenizer,
                    keep_last: int = 2) -> Path:
    root = ckpt_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
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
    if final.exists():  # same step saved again (e.g. signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # leftovers of killed writers
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict:
    mpath = path / "MANIFEST.json"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: {mpath} is unreadable or corrupted ({e})") from e
    for rel, info in files.items():
        p = path / rel
        if not p.exists():
            raise CheckpointError(f"checkpoint {path}: file {p} is missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: file {p} is truncated or changed ({size} bytes, expected {info['bytes']})")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {p} is corrupted (sha256 mismatch)")
    return manifest


def load_checkpoint(path) -> dict:
    """Verify and load one checkpoint: {model, optimizer, rng, state, tokenizer, path}."""
    path = Path(path)
    verify_checkpoint(path)

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:  # verified bytes but unloadable: still name the file
            raise CheckpointError(f"checkpoint {path}: cannot load {path / name} ({type(e).__name__}: {e})") from e

    return {
        "model": guarded("model.safetensors", lambda: load_file(str(path / "model.safetensors"))),
        "optimizer": guarded("optimizer.pt", lambda: torch.load(path / "optimizer.pt", weights_only=True)),
        "rng": guarded("rng.pt", lambda: torch.load(path / "rng.pt", weights_only=True)),
        "state": guarded("state.json", lambda: json.loads((path / "state.json").read_text())),
        "tokenizer": guarded("tokenizer", lambda: load_tokenizer(path / "tokenizer")),
        "path": path,
    }


def load_latest(out_dir, log=print) -> Optional[dict]:
    """The newest checkpoint that verifies; older ones are tried when newer ones are corrupted."""
    cks = list_checkpoints(out_dir)
    for p in reversed(cks):
        try:
            return load_checkpoint(p)
        except CheckpointError as e:
            msg = f"{e}; falling back to the previous complete checkpoint"
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
