"""Tokenizers: byte-level (256 symbols, no training) and byte-level BPE trained locally with `tokenizers`.

Both expose encode(text) -> list[int], decode(ids) -> str, vocab_size, token_bytes() (the UTF-8 byte length
of every token, used for bits per byte), save(dir) / load_tokenizer(dir). BPE is saved as tokenizer.json
(the `tokenizers` format) next to fmk_tokenizer.json, which names the kind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

META = "fmk_tokenizer.json"


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / META).write_text(json.dumps({"kind": "byte", "vocab_size": 256}))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-unicode table (what tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
            special_tokens=[],
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        u2b = {u: b for b, u in _bytes_to_unicode().items()}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for s, i in self.tok.get_vocab().items():
            out[i] = sum(1 for c in s if c in u2b)
        return out

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        (d / META).write_text(json.dumps({"kind": "bpe", "vocab_size": self.vocab_size}))


def load_tokenizer(directory):
    d = Path(directory)
    meta_path = d / META
    if not meta_path.exists():
        raise FileNotFoundError(f"no tokenizer in {d} ({META} missing)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "byte":
        return ByteTokenizer()
    if meta.get("kind") == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_file(str(d / "tokenizer.json")))
    if meta.get("kind") == "hf":
        from .hf_tokenizer import HFTokenizer

        return HFTokenizer.load(d, meta.get("vocab_size"))
    raise ValueError(f"{meta_path}: unknown tokenizer kind {meta.get('kind')!r}")
