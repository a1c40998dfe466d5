"""Shared helpers for the trainer tests (not a conftest: other test files stay untouched)."""
import functools
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _stdlib_bytes() -> np.ndarray:
    from fmkernels.data import stdlib_documents

    docs, _ = stdlib_documents()
    text = "\n\n".join(d.text for d in docs[:200])
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


@pytest.fixture
def stdlib_bytes():
    return _stdlib_bytes()


@pytest.fixture
def small_corpus(tmp_path):
    """A small directory corpus: 30 stdlib files copied (real text, fast to tokenize)."""
    from fmkernels.data import stdlib_files

    d = tmp_path / "corpus"
    d.mkdir()
    for rel, path in stdlib_files()[:30]:
        (d / rel.replace("/", "__")).write_bytes(path.read_bytes())
    return d


def fmk(*args, env=None, timeout=300, **kw):
    """Run `python -m fmkernels.cli ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "fmkernels.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=REPO, **kw)
