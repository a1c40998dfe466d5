"""`fmk eval` / `fmk generate` helpers: load a checkpoint into a Transformer, evaluate it on a corpus's
validation split (encoded with the checkpoint's own tokenizer), or generate text."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data import bits_per_byte, eval_windows, load_documents, split_documents
from ..models import Transformer, TransformerConfig
from .checkpoint import load_checkpoint, resolve_checkpoint


def load_model(path) -> tuple[Transformer, object, dict]:
    """A Transformer (LoRA adapters of a fine-tuned checkpoint merged in; the 2:4 / int8 / int4 layers of a compressed
    one kept, so their kernels run), its tokenizer, the checkpoint."""
    from .compress import build_model, is_compressed
    from .finetune import is_lora_checkpoint, load_pretrained

    ck = load_checkpoint(resolve_checkpoint(path))
    if is_compressed(ck["model"]) and not is_lora_checkpoint(ck):
        mcfg = TransformerConfig.from_dict(ck["state"]["model_config"])
        return build_model(mcfg, ck["model"], ck["state"].get("compress")), ck["tokenizer"], ck
    pre = load_pretrained(ck["path"], ck)
    model = Transformer(pre["model_config"])
    model.load_state_dict(pre["model"])
    model.eval()
    return model, pre["checkpoint"]["tokenizer"], pre["checkpoint"]


@torch.no_grad()
def evaluate_checkpoint(path, corpus=None, val_fraction=None, include_tests=None, text_field="text",
                        max_tokens=None, batch_size=16, seq_len=None) -> dict:
    model, tok, ck = load_model(path)
    cfg = ck["state"]["config"]
    corpus = corpus or cfg["corpus"]
    val_fraction = val_fraction if val_fraction is not None else cfg["val_fraction"]
    include_tests = include_tests if include_tests is not None else cfg["stdlib_tests"]
    seq_len = seq_len or model.cfg.max_seq_len
    docs, digest = load_documents(corpus, include_tests, text_field)
    _, val = split_documents(docs, val_fraction)
    ids = np.concatenate([np.asarray(tok.encode(d.text + "\n\n"), dtype=np.int64) for d in val])
    tb = torch.from_numpy(tok.token_bytes())
    nll, ntok, nbytes, xs, ys, fwd_s = 0.0, 0, 0, [], [], 0.0

    def flush():
        nonlocal nll, ntok, nbytes, fwd_s
        if xs:
            x, y = torch.stack(xs), torch.stack(ys)
            t0 = time.perf_counter()
            nll += float(model(x, y, reduction="sum"))
            fwd_s += time.perf_counter() - t0
            ntok += y.numel()
            nbytes += int(tb[y].sum())
            xs.clear()
            ys.clear()

    for x, y in eval_windows(ids, seq_len, max_tokens):
        if xs and x.shape[0] != xs[0].shape[0]:
            flush()
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            flush()
    flush()
    return dict(checkpoint=str(ck["path"]), step=ck["state"]["step"], corpus=corpus, corpus_hash=digest,
                tokens=ntok, bytes=nbytes, val_loss=nll / max(ntok, 1), val_bpb=bits_per_byte(nll, nbytes),
                tokens_per_s=ntok / max(fwd_s, 1e-9))
