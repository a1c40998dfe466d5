"""A transformers tokenizer (Hugging Face directory or GGUF) behind fmkernels' tokenizer interface."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .tokenizer import META, _bytes_to_unicode


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
