"""Compressor yardstick: what general-purpose compressors pay per byte for a corpus's validation split.

A language model trained on a corpus should beat a compressor that has the same training text in its
dictionary. Two figures per compressor, in bits per byte of the validation text (the same bytes the trainer's
`validation (full split)` line counts: every document's text followed by "\\n\\n", UTF-8):
- `alone`: compress(val) alone;
- `with_train`: compress(train + val) - compress(train), the validation bytes' cost once the compressor has
  seen the training split (xz -9e keeps a 64 MiB window, so it sees all of a ~12 MB split; bz2 works on
  900 kB blocks and zlib on a 32 kB window, so their context figure barely moves: they are listed for scale).

Results are cached by (corpus hash, split) in the corpus's token-cache root, since xz -9e over the standard
library's ~12 MB takes ~10 s per pass on the 2-core EPYC.
"""
from __future__ import annotations

import bz2
import json
import lzma
import os
import zlib
from pathlib import Path
from typing import Callable, Iterable

from .corpus import load_documents, split_documents

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    # xz -9e: LZMA2, preset 9 with the extreme flag, .xz container (as the xz command writes it)
    "xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
    "bz2": lambda b: bz2.compress(b, compresslevel=9),
    "zlib": lambda b: zlib.compress(b, 9),
}
CACHE_VERSION = 1


def split_bytes(corpus: str = "stdlib", val_fraction: float = 0.05, include_tests: bool = False,
                text_field: str = "text") -> tuple[bytes, bytes, str]:
    """(train bytes, validation bytes, corpus hash), joined exactly as the tokenizer cache joins them."""
    docs, digest = load_documents(corpus, include_tests, text_field)
    train, val = split_documents(docs, val_fraction)
    join = lambda ds: "".join(d.text + "\n\n" for d in ds).encode("utf-8")  # noqa: E731
    return join(train), join(val), digest


def compressed_bits_per_byte(train: bytes, val: bytes, methods: Iterable[str] = ("xz", "bz2", "zlib")) -> dict:
    """{method: {"alone": bpb, "with_train": bpb}} for the validation bytes."""
    if not val:
        raise ValueError("val: the validation split is empty; there is nothing to measure")
    out = {}
    for m in methods:
        if m not in COMPRESSORS:
            raise ValueError(f"methods: unknown compressor {m!r}; expected some of {sorted(COMPRESSORS)}")
        c = COMPRESSORS[m]
        alone = len(c(val))
        with_train = len(c(train + val)) - len(c(train)) if train else alone
        out[m] = {"alone": 8 * alone / len(val), "with_train": 8 * with_train / len(val)}
    return out


def _cache_path(digest: str, val_fraction: float, include_tests: bool) -> Path:
    root = Path(os.environ.get("FMK_CACHE_DIR", Path.home() / ".cache" / "fmkernels"))
    return root / "compressor" / f"{digest[:16]}-val{round(1000 * val_fraction)}-t{int(include_tests)}-v{CACHE_VERSION}.json"


def compressor_baseline(corpus: str = "stdlib", val_fraction: float = 0.05, include_tests: bool = False,
                        text_field: str = "text", methods: Iterable[str] = ("xz", "bz2", "zlib"),
                        use_cache: bool = True) -> dict:
    """The yardstick for one corpus and split: {"corpus_hash", "train_bytes", "val_bytes", "bpb": {...}}."""
    methods = tuple(methods)
    train, val, digest = split_bytes(corpus, val_fraction, include_tests, text_field)
    path = _cache_path(digest, val_fraction, include_tests)
    cached = {}
    if use_cache and path.exists():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
    bpb = dict(cached.get("bpb", {}))
    todo = [m for m in methods if m not in bpb]
    if todo:
        bpb.update(compressed_bits_per_byte(train, val, todo))
    result = {"corpus_hash": digest, "train_bytes": len(train), "val_bytes": len(val),
              "bpb": {m: bpb[m] for m in methods}}
    if use_cache and todo:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({**result, "bpb": bpb}, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the next call the compression time
    return result


def format_baseline(result: dict) -> list[str]:
    """Summary lines, e.g. `compressor yardstick: xz -9e 1.497 bits per byte alone, 1.130 with the training split`."""
    names = {"xz": "xz -9e", "bz2": "bzip2 -9", "zlib": "zlib -9"}
    return [f"compressor yardstick: {names.get(m, m)} {v['alone']:.3f} bits per byte alone, "
            f"{v['with_train']:.3f} with the training split as context" for m, v in result["bpb"].items()]
