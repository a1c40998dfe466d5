"""`fmk eval` / `fmk generate` helpers: load a checkpoint into a Transformer, evaluate it on a corpus's
validation split (encoded with the checkpoint's own tokenizer), or generate text."""
from __future__ import annotations

import numpy as np
import torch

from ..data import load_documents, split_documents
from .metrics import compressor_yardstick, lm_eval
from .model_source import load_model


@torch.no_grad()
def evaluate_checkpoint(path, corpus=None, val_fraction=None, include_tests=None, text_field="text",
                        max_tokens=None, batch_size=16, seq_len=None, yardstick: bool = True) -> dict:
    """{checkpoint, step, corpus, tokens, bytes, val_loss, val_bpb, tokens_per_s} and, for the full split with
    yardstick, the compressor figures on the same validation bytes (compressor_bpb, compressor_time_s)."""
    model, tok, ck = load_model(path)
    cfg = ck["state"]["config"]
    corpus = corpus or cfg["corpus"]
    val_fraction = val_fraction if val_fraction is not None else cfg["val_fraction"]
    include_tests = include_tests if include_tests is not None else cfg["stdlib_tests"]
    seq_len = seq_len or model.cfg.max_seq_len
    docs, digest = load_documents(corpus, include_tests, text_field)
    _, val = split_documents(docs, val_fraction)
    ids = np.concatenate([np.asarray(tok.encode(d.text + "\n\n"), dtype=np.int64) for d in val])
    r = lm_eval(model, ids, tok.token_bytes(), seq_len, batch_size, torch.device("cpu"), max_tokens=max_tokens)
    out = dict(checkpoint=str(ck["path"]), step=ck["state"]["step"], corpus=corpus, corpus_hash=digest,
               tokens=r["tokens"], bytes=r["bytes"], val_loss=r["loss"], val_bpb=r["bpb"],
               tokens_per_s=r["tokens"] / max(r["forward_s"], 1e-9))
    if yardstick and max_tokens is None:
        out.update(compressor_yardstick(corpus, val_fraction, include_tests, text_field))
    return out
