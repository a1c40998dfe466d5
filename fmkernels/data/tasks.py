"""Labelled data built from a local corpus: which package a chunk of code comes from.

The label of a document is the first component of its relative path (`email/mime/text.py` -> `email`); single
files at the top level (`os.py`) have no package and are left out. For the embedded stdlib corpus this is the
standard-library package; for a user directory corpus it is the top-level folder.

Split: by file, with the corpus's own hash split (`is_validation(key, val_fraction)`), so the held-out files
of the classification task are exactly the validation files of the language-modelling task (a multitask run
never trains its LM on the text it is then asked to classify).

Classes: the `n_classes` packages with the most training text among those with at least `min_val_chars`
of validation text and `min_train_chars` of training text (ties broken by name). Chunks: windows of a file,
at most `max_chunks_per_file` per file (evenly spaced, so large files do not swamp a class).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .corpus import CorpusError, Document, is_validation, load_documents

MIN_VAL_CHARS = 2000
MIN_TRAIN_CHARS = 20000


def package_of(key: str) -> Optional[str]:
    """`email/mime/text.py` -> `email`; a top-level file or a non-path key -> None."""
    parts = key.split("/")
    return parts[0] if len(parts) > 1 and parts[0] else None


@dataclass
class PackageSplit:
    classes: list  # class names; label i = classes[i]
    train: list  # [(Document, label)]
    val: list  # [(Document, label)]


def package_split(corpus: str = "stdlib", val_fraction: float = 0.2, n_classes: int = 8, include_tests: bool = False,
                  text_field: str = "text", min_val_chars: int = MIN_VAL_CHARS,
                  min_train_chars: int = MIN_TRAIN_CHARS, docs: Optional[list] = None) -> PackageSplit:
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"package_split: n_classes must be an integer >= 2, got {n_classes!r}")
    if docs is None:
        docs, _ = load_documents(corpus, include_tests, text_field)
    size: dict[str, list] = {}
    for d in docs:
        pkg = package_of(d.key)
        if pkg is None:
            continue
        s = size.setdefault(pkg, [0, 0])
        s[1 if is_validation(d.key, val_fraction) else 0] += len(d.text)
    ok = [p for p, (tr, va) in size.items() if tr >= min_train_chars and va >= min_val_chars]
    ok.sort(key=lambda p: (-size[p][0], p))
    if len(ok) < n_classes:
        raise CorpusError(
            f"package classification: corpus {corpus!r} has {len(ok)} packages with >= {min_train_chars} training "
            f"and >= {min_val_chars} validation characters at val_fraction={val_fraction} ({', '.join(ok) or 'none'}); "
            f"n_classes={n_classes} asks for more (lower n_classes or raise val_fraction)")
    classes = sorted(ok[:n_classes])
    index = {p: i for i, p in enumerate(classes)}
    train, val = [], []
    for d in docs:
        pkg = package_of(d.key)
        if pkg in index:
            (val if is_validation(d.key, val_fraction) else train).append((d, index[pkg]))
    return PackageSplit(classes, train, val)


def _pick(n: int, k: int) -> np.ndarray:
    """k evenly spaced indices of range(n) (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def token_chunks(items: list, encode: Callable[[str], list], seq_len: int, max_chunks_per_file: int = 16,
                 min_len: Optional[int] = None):
    """items [(Document, label)] -> (ids (n, seq_len) int64 right-padded with 0, lengths (n,), labels (n,)).
    A file gives its non-overlapping seq_len windows (a tail window if >= min_len tokens, default seq_len // 4;
    a file shorter than a window gives one padded chunk of its tokens if >= min_len)."""
    min_len = max(1, seq_len // 4) if min_len is None else min_len
    rows, lens, labels = [], [], []
    for d, y in items:
        ids = np.asarray(encode(d.text), dtype=np.int64)
        starts = [s for s in range(0, len(ids), seq_len) if min(seq_len, len(ids) - s) >= min_len]
        for i in _pick(len(starts), max_chunks_per_file):
            w = ids[starts[i] : starts[i] + seq_len]
            row = np.zeros(seq_len, dtype=np.int64)
            row[: len(w)] = w
            rows.append(row)
            lens.append(len(w))
            labels.append(y)
    if not rows:
        raise CorpusError(f"package classification: no chunk of >= {min_len} tokens in {len(items)} files")
    return np.stack(rows), np.asarray(lens, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def text_chunks(items: list, max_chars: int = 600, max_chunks_per_file: int = 16, min_chars: int = 80):
    """items [(Document, label)] -> ([text], labels (n,)): blocks of whole lines up to max_chars characters
    (blank-only blocks and blocks under min_chars dropped), at most max_chunks_per_file per file, evenly spaced."""
    texts, labels = [], []
    for d, y in items:
        blocks, cur = [], ""
        for line in d.text.splitlines(keepends=True):
            if cur and len(cur) + len(line) > max_chars:
                blocks.append(cur)
                cur = ""
            cur += line[:max_chars]
        if cur:
            blocks.append(cur)
        blocks = [b for b in blocks if len(b.strip()) >= min_chars]
        for i in _pick(len(blocks), max_chunks_per_file):
            texts.append(blocks[i])
            labels.append(y)
    if not texts:
        raise CorpusError(f"package classification: no text block of >= {min_chars} characters in {len(items)} files")
    return texts, np.asarray(labels, dtype=np.int64)


def majority_accuracy(train_labels: np.ndarray, val_labels: np.ndarray) -> dict:
    """Constant-prediction baselines on the validation labels: the training split's most frequent class
    (`majority_acc`, the usual majority-class baseline) and the best constant in hindsight (`best_constant_acc`,
    the validation split's own most frequent class; never below the first)."""
    top = int(np.bincount(train_labels).argmax())
    counts = np.bincount(val_labels)
    return dict(majority_class=top, majority_acc=float((val_labels == top).mean()),
                best_constant_acc=float(counts.max() / max(len(val_labels), 1)))


__all__ = ["PackageSplit", "package_of", "package_split", "token_chunks", "text_chunks", "majority_accuracy",
           "Document"]
