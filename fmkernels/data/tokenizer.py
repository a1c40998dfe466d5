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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


class HFTokenizer:
    """A transformers tokenizer behind fmkernels' tokenizer interface (encode, decode, vocab_size, token_bytes, save).
    encode adds no special tokens; documents end with eos_id."""

    kind = "hf"

    def __init__(self, tok, vocab_size: Optional[int] = None):
        self.tok = tok
        self.vocab_size = int(vocab_size or len(tok))
        eos = tok.eos_token_id
        self.eos_id = int(eos) if eos is not None else None
        pad = tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else (self.eos_id or 0)
        self._tb = None

    @property
    def chat_template(self):
        return getattr(self.tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """(vocab,) UTF-8 bytes each token stands for (0 for special tokens): for bits per byte."""
        if self._tb is None:
            toks = self.tok.convert_ids_to_tokens(list(range(min(self.vocab_size, len(self.tok)))))
            special = set(self.tok.all_special_ids or [])
            byte_level = any(t is not None and "Ġ" in t for t in toks[:5000])
            dec = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else None
            out = np.zeros(self.vocab_size, dtype=np.int64)
            for i, t in enumerate(toks):
                if t is None or i in special:
                    continue
                if dec is not None and all(c in dec for c in t):
                    out[i] = len(t)
                elif t.startswith("<0x") and t.endswith(">") and len(t) == 6:
                    out[i] = 1
                else:
                    out[i] = len(t.replace("\u2581", " ").encode())
            self._tb = out
        return self._tb

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(d))
        (d / META).write_text(json.dumps({"kind": "hf", "vocab_size": self.vocab_size}))

    @classmethod
    def load(cls, directory, vocab_size: Optional[int] = None) -> "HFTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(directory)), vocab_size)


def load_tokenizer(directory):
    d = Path(directory)
    meta_path = d / META
    if not meta_path.exists():
        raise FileNotFoundError(f"no tokenizer in {d} ({META} missing)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "byte":
        return ByteTokenizer()
    if meta.get("kind") == "bpe":
        return BPETokenizer(Tokenizer.from_file(str(d / "tokenizer.json")))
    if meta.get("kind") == "hf":
        return HFTokenizer.load(d, meta.get("vocab_size"))
    raise ValueError(f"{meta_path}: unknown tokenizer kind {meta.get('kind')!r}")
