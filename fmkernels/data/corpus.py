"""Text corpora: the embedded default (the Python standard library's own source) and user corpora.

Embedded corpus, deterministic on every install of the same Python version:
- files: every `*.py` under `sysconfig.get_paths()["stdlib"]`, sorted by relative POSIX path;
- excluded: anything under a `site-packages` or `dist-packages` folder (machine-specific), `__pycache__`,
  the generated `_sysconfigdata_*.py`, and `python-config.py`;
- test-folder policy: by default every file under a folder named `test`, `tests` or `idle_test` is EXCLUDED
  (about 12 MB remain); `include_tests=True` keeps them (about 30 MB). Nothing else depends on the policy;
- decoding: UTF-8 with errors="replace" (a few test files are not UTF-8);
- split: a document is validation when int(sha256(relative path)[:8], 16) % 1000 < 1000 * val_fraction;
- `corpus_hash`: sha256 over (relative path, raw bytes) of every file, logged by the trainer, so runs can be
  compared (same hash = same text).
User corpora: a directory (every *.txt/*.md/*.py/*.rst/*.json file, recursively, sorted), a single .txt file
(split into 64 KiB blocks), or JSON Lines with a text field. Same hash split, per file / block / line.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json")
TXT_BLOCK = 64 * 1024


class CorpusError(ValueError):
    """A corpus that cannot be used (missing path, empty, unreadable field)."""


@dataclass
class Document:
    key: str  # stable identifier used for the split (relative path, path#block, path:line)
    text: str


def stdlib_files(include_tests: bool = False) -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        parts = set(rel_dir.parts)
        keep = [d for d in dirnames if d not in EXCLUDED_DIRS and (include_tests or d not in TEST_DIRS)]
        dirnames[:] = keep
        if parts & EXCLUDED_DIRS or (not include_tests and parts & TEST_DIRS):
            continue
        for f in filenames:
            if not f.endswith(".py") or f.startswith("_sysconfigdata_") or f == "python-config.py":
                continue
            rel = (rel_dir / f).as_posix()
            out.append((rel, Path(dirpath) / f))
    out.sort(key=lambda t: t[0])
    return out


def is_validation(key: str, val_fraction: float) -> bool:
    h = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)
    return h % 1000 < round(1000 * val_fraction)


def stdlib_documents(include_tests: bool = False) -> tuple[list[Document], str]:
    """(documents in sorted order, corpus hash)."""
    h = hashlib.sha256()
    docs = []
    for rel, path in stdlib_files(include_tests):
        raw = path.read_bytes()
        h.update(rel.encode() + b"\0" + raw + b"\0")
        docs.append(Document(rel, raw.decode("utf-8", errors="replace")))
    return docs, h.hexdigest()


def _user_documents(path: Path, text_field: str) -> Iterator[Document]:
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and ".fmk-cache" not in p.parts),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        for p in files:
            yield Document(p.relative_to(path).as_posix(), p.read_bytes().decode("utf-8", errors="replace"))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"corpus {path}: line {i + 1} is not valid JSON ({e})") from e
                if not isinstance(obj, dict) or text_field not in obj:
                    raise CorpusError(f"corpus {path}: line {i + 1} has no text field {text_field!r} (set text_field)")
                yield Document(f"{i}", str(obj[text_field]))
    else:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for b in range(0, len(text), TXT_BLOCK):
            yield Document(f"{b // TXT_BLOCK}", text[b : b + TXT_BLOCK])


def user_documents(path: str | os.PathLike, text_field: str = "text") -> tuple[list[Document], str]:
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus: path {str(p)!r} does not exist")
    docs = list(_user_documents(p, text_field))
    h = hashlib.sha256()
    for d in docs:
        h.update(d.key.encode() + b"\0" + d.text.encode("utf-8") + b"\0")
    return docs, h.hexdigest()


def load_documents(corpus: str, include_tests: bool = False, text_field: str = "text") -> tuple[list[Document], str]:
    docs, digest = stdlib_documents(include_tests) if corpus == "stdlib" else user_documents(corpus, text_field)
    if not docs or not any(d.text for d in docs):
        raise CorpusError(f"corpus: {corpus!r} contains no text")
    return docs, digest


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    train, val = [], []
    for d in docs:
        (val if is_validation(d.key, val_fraction) else train).append(d)
    if not val and docs:  # tiny corpora: keep at least one validation document
        val.append(train.pop())
    if not train:
        raise CorpusError("corpus: every document fell into the validation split; add text or lower val_fraction")
    return train, val
