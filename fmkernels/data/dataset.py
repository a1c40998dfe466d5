"""Token caches and batches.

`prepare_data(...)` tokenizes a corpus ONCE into memory-mapped token files (uint16 when the vocab fits,
else uint32) plus the tokenizer, in a cache directory: beside the data for user corpora (`<path>.fmk-cache/`
or `<dir>/.fmk-cache/`), in $FMK_CACHE_DIR (default ~/.cache/fmkernels) for the embedded corpus. The cache
key holds the corpus hash, tokenizer kind/size and split, so any change re-tokenizes. Files are written to a
temporary name and renamed; a cache counts only when its meta.json exists.

`BatchSampler`: batch (step, micro_step) of rank r is drawn from a generator seeded by (seed, step,
micro_step, r) inside rank r's contiguous shard of the training tokens: stateless, so the data position of
a run is its step counter and resuming replays exactly the same batches.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .augment import rename_identifiers
from .corpus import CorpusError, Document, load_documents, split_documents
from .tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

CACHE_VERSION = 1


@dataclass
class DataBundle:
    train: np.ndarray  # memmap, (n_train,)
    val: np.ndarray  # memmap, (n_val,)
    tokenizer: object
    corpus_hash: str
    cache_dir: Path
    token_bytes: np.ndarray  # (vocab,) UTF-8 bytes per token
    n_docs: tuple  # (train, val)


def _cache_dir(corpus: str, key: str) -> Path:
    if corpus == "stdlib":
        root = Path(os.environ.get("FMK_CACHE_DIR", Path.home() / ".cache" / "fmkernels"))
        return root / "stdlib" / key
    p = Path(corpus)
    base = p / ".fmk-cache" if p.is_dir() else p.parent / (p.name + ".fmk-cache")
    return base / key


def _write_tokens(path: Path, chunks, dtype) -> int:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        for arr in chunks:
            a = np.asarray(arr).astype(dtype, copy=False)
            f.write(a.tobytes())
            n += a.size
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def prepare_data(
    corpus: str = "stdlib",
    tokenizer: str = "byte",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    include_tests: bool = False,
    text_field: str = "text",
    log: Callable[[str], None] = print,
    tokenizer_dir: Optional[str] = None,
    rename_p: float = 0.0,
    rename_seed: int = 0,
) -> DataBundle:
    """tokenizer_dir: encode with this saved tokenizer (e.g. a pretrained checkpoint's) instead of building one.
    rename_p > 0: each training Python document (.py key) is, with probability rename_p, replaced by a copy with
    its function-local names consistently renamed (fmkernels.data.augment.rename_identifiers), drawn once per
    tokenization and deterministic in rename_seed; the validation split is never touched."""
    docs, digest = load_documents(corpus, include_tests, text_field)
    train_docs, val_docs = split_documents(docs, val_fraction)
    tok_key = "byte" if tokenizer == "byte" else f"bpe{vocab_size}"
    if tokenizer_dir is not None:
        h = hashlib.sha256()
        for f in sorted(Path(tokenizer_dir).rglob("*")):
            if f.is_file():
                h.update(f.relative_to(tokenizer_dir).as_posix().encode() + b"\0" + f.read_bytes())
        tok_key = f"tok{h.hexdigest()[:16]}"
    key = f"{digest[:16]}-{tok_key}-val{round(1000 * val_fraction)}-v{CACHE_VERSION}"
    if rename_p > 0:
        key += f"-ren{rename_p:g}s{rename_seed}"
    cdir = _cache_dir(corpus, key)
    meta_path = cdir / "meta.json"
    if not meta_path.exists():
        cdir.mkdir(parents=True, exist_ok=True)
        if tokenizer_dir is not None:
            tok = load_tokenizer(tokenizer_dir)
        elif tokenizer == "byte":
            tok = ByteTokenizer()
        elif tokenizer == "bpe":
            log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(train_docs)} documents ...")
            tok = BPETokenizer.train((d.text for d in train_docs), vocab_size)
        else:
            raise CorpusError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
        tok.save(cdir / "tokenizer")
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32

        def chunks(ds):
            for i in range(0, len(ds), 256):
                batch = [d.text + "\n\n" for d in ds[i : i + 256]]
                if isinstance(tok, BPETokenizer):
                    for ids in tok.encode_batch(batch):
                        yield np.asarray(ids, dtype=np.int64)
                else:
                    yield tok.encode_array("".join(batch))

        if rename_p > 0:
            train_docs = _rename_docs(train_docs, rename_p, rename_seed, log)
        log(f"tokenizing {len(docs)} documents into {cdir} ...")
        n_train = _write_tokens(cdir / "train.bin", chunks(train_docs), dtype)
        n_val = _write_tokens(cdir / "val.bin", chunks(val_docs), dtype)
        meta = dict(
            corpus=corpus, corpus_hash=digest, tokenizer=tok.kind, vocab_size=tok.vocab_size,
            dtype=np.dtype(dtype).name, n_train=n_train, n_val=n_val, n_docs=[len(train_docs), len(val_docs)],
            val_fraction=val_fraction, include_tests=include_tests, version=CACHE_VERSION,
        )
        tmp = meta_path.with_name(f"meta.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
    meta = json.loads(meta_path.read_text())
    tok = load_tokenizer(cdir / "tokenizer")
    dt = np.dtype(meta["dtype"])
    train = np.memmap(cdir / "train.bin", dtype=dt, mode="r", shape=(meta["n_train"],))
    val = np.memmap(cdir / "val.bin", dtype=dt, mode="r", shape=(meta["n_val"],))
    return DataBundle(train, val, tok, digest, cdir, tok.token_bytes(), tuple(meta["n_docs"]))


def _rename_docs(docs, p: float, seed: int, log) -> list:
    out, n = [], 0
    for d in docs:
        k = int.from_bytes(hashlib.sha256(d.key.encode()).digest()[:8], "little")
        rng = np.random.default_rng([seed, k])
        if d.key.split("#")[0].split(":")[0].endswith(".py") and rng.random() < p:
            r = rename_identifiers(d.text, seed=int(rng.integers(1 << 31)))
            if r is not None:
                d, n = Document(d.key, r), n + 1
        out.append(d)
    log(f"identifier renaming: {n} of {len(docs)} training documents rewritten")
    return out


class BatchSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        n = len(tokens) - seq_len - 1
        if n < world:
            raise CorpusError(
                f"corpus: the training split has {len(tokens)} tokens, too few for seq_len={seq_len} "
                f"(needs more than {seq_len + world})"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.lo, self.hi = rank * n // world, (rank + 1) * n // world
        self.rank = rank

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, self.rank])
        offs = rng.integers(self.lo, self.hi, size=self.batch_size)
        T = self.seq_len
        x = np.stack([np.asarray(self.tokens[o : o + T + 1], dtype=np.int64) for o in offs])
        x = torch.from_numpy(x)
        return x[:, :-1], x[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: Optional[int] = None):
    """Non-overlapping (input, target) windows covering the split (the last one shorter), in order."""
    n = len(tokens) - 1
    if max_tokens is not None:
        n = min(n, max_tokens)
    for s in range(0, n, seq_len):
        e = min(n, s + seq_len)
        w = np.asarray(tokens[s : e + 1], dtype=np.int64)
        yield torch.from_numpy(w[:-1]), torch.from_numpy(w[1:])


def bits_per_byte(sum_nll_nats: float, n_bytes: int) -> float:
    return sum_nll_nats / math.log(2) / max(n_bytes, 1)
