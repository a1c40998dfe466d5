"""Fine-tuning data for pretrained decoders: .txt, or .jsonl with `text`, `prompt`/`completion` or `messages`
(chat, rendered with the tokenizer's chat template), packed into rows of seq_len tokens without attention across
documents.

Each document becomes (x, y) pairs, y = the next token or -100 where no loss is taken: the prompt / non-assistant
tokens with train_on="completion" (the default), nothing with train_on="all". Rows are packed greedily in file
order; `seg` (R, T) numbers the documents of each row; batches carry them as cu_seqlens (the model attends inside a
document only, RoPE positions restarting per document); the tail
of a row is padding (its own segment, targets -100). The held-out split is every k-th document (deterministic),
and the training order is a per-epoch permutation keyed by (seed, epoch): a batch is a function of the step,
so a resumed run sees the same batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .corpus import CorpusError, load_documents

FORMATS = ("text", "prompt_completion", "messages")


@dataclass
class Record:
    kind: str  # one of FORMATS
    value: object  # str | (prompt, completion) | list of {role, content}
    where: str  # "file:line"


def read_records(path, text_field: str = "text") -> list[Record]:
    """Records of a .txt (paragraph groups of >= 2000 characters) or .jsonl file. A jsonl line without the
    expected fields raises CorpusError naming the file and line."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"data: {str(p)!r} does not exist (a .txt or .jsonl file)")
    if p.suffix == ".txt":
        text = p.read_text(encoding="utf-8", errors="replace")
        out, cur, n = [], [], 0
        for para in text.split("\n\n"):
            cur.append(para)
            n += len(para)
            if n >= 2000:
                out.append(Record("text", "\n\n".join(cur), f"{p}"))
                cur, n = [], 0
        if cur and "".join(cur).strip():
            out.append(Record("text", "\n\n".join(cur), f"{p}"))
        if not out:
            raise CorpusError(f"data: {p} is empty")
        return out
    if p.suffix != ".jsonl":
        raise CorpusError(f"data: {str(p)!r} must be a .txt or .jsonl file")
    out, kind = [], None
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{i}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"data: {where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"data: {where}: expected a JSON object, got {type(obj).__name__}")
            if kind is None:
                kind = ("messages" if "messages" in obj else "prompt_completion" if "prompt" in obj
                        else "text" if text_field in obj else None)
                if kind is None:
                    raise CorpusError(f"data: {where}: expected a field {text_field!r}, 'prompt' and 'completion', or "
                                      f"'messages'; found {sorted(obj)}")
            out.append(Record(kind, _field(obj, kind, text_field, where), where))
    if not out:
        raise CorpusError(f"data: {p} has no records")
    return out


def _field(obj: dict, kind: str, text_field: str, where: str):
    def need(k, typ):
        if k not in obj:
            raise CorpusError(f"data: {where}: missing field {k!r} (the file's format is {kind}; found {sorted(obj)})")
        if not isinstance(obj[k], typ):
            raise CorpusError(f"data: {where}: field {k!r} must be a {typ.__name__}, got {type(obj[k]).__name__}")
        return obj[k]

    if kind == "text":
        return need(text_field, str)
    if kind == "prompt_completion":
        return need("prompt", str), need("completion", str)
    msgs = need("messages", list)
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CorpusError(f"data: {where}: messages[{j}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise CorpusError(f"data: {where}: messages has no 'assistant' turn (nothing to train on)")
    return msgs


def tokenize_record(r: Record, tok, train_on: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), trained (n,) bool): which tokens are loss targets."""
    eos = [tok.eos_id] if getattr(tok, "eos_id", None) is not None else []
    if r.kind == "text":
        ids = tok.encode(r.value) + eos
        return np.asarray(ids, np.int64), np.ones(len(ids), bool)
    if r.kind == "prompt_completion":
        p, c = tok.encode(r.value[0]), tok.encode(r.value[1]) + eos
        mask = [train_on == "all"] * len(p) + [True] * len(c)
        return np.asarray(p + c, np.int64), np.asarray(mask, bool)
    return _chat(r, tok, train_on)


def _chat(r: Record, tok, train_on: str):
    hf = getattr(tok, "tok", None)
    if hf is None or not getattr(hf, "chat_template", None):
        raise CorpusError(f"data: {r.where}: 'messages' needs a tokenizer with a chat template; this tokenizer "
                          f"({type(hf if hf is not None else tok).__name__}) has none")
    msgs = r.value
    texts = [hf.apply_chat_template(msgs[: i + 1], tokenize=False) for i in range(len(msgs))]
    full = texts[-1]
    spans, prev = [], 0
    for m, t in zip(msgs, texts):
        if not t.startswith(full[:prev]) or len(t) < prev:  # the template does not render prefixes as prefixes
            spans = None
            break
        spans.append((prev, len(t), m["role"] == "assistant"))
        prev = len(t)
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on == "all":
        return np.asarray(ids, np.int64), np.ones(len(ids), bool)
    if spans is None:
        raise CorpusError(f"data: {r.where}: the chat template does not render conversations prefix by prefix; "
                          f"use --train_on all")
    mask = []
    for a, _ in enc["offset_mapping"]:
        mask.append(any(s <= a < e and asst for s, e, asst in spans))
    return np.asarray(ids, np.int64), np.asarray(mask, bool)


def cu_seqlens_of(seg: torch.Tensor) -> torch.Tensor:
    """segments (B, T) (document index within each row) -> int32 (S + 1,) prefix sums over the B * T row-major
    tokens: the documents (and padding tails) of every row, as Transformer(cu_seqlens=...) and
    flash_attention_varlen take them."""
    B, T = seg.shape
    flat = seg.reshape(-1)
    cut = torch.ones(B * T, dtype=torch.bool)
    cut[1:] = flat[1:] != flat[:-1]
    cut[::T] = True  # every row starts a document
    starts = torch.nonzero(cut).flatten()
    return torch.cat([starts, torch.tensor([B * T])]).to(torch.int32)


@dataclass
class PackedRows:
    x: np.ndarray  # (R, T) int64
    y: np.ndarray  # (R, T) int64, -100 = no loss
    seg: np.ndarray  # (R, T) int64 document index within the row (padding: its own)

    def __len__(self):
        return self.x.shape[0]


def pack(docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> PackedRows:
    """Greedy in order: a document's (x, y) pairs go into the current row if they fit, else into a new row."""
    rows, cur = [], []
    used = 0
    for x, y in docs:
        n = len(x)
        if used + n > seq_len and cur:
            rows.append(cur)
            cur, used = [], 0
        cur.append((x, y))
        used += n
    if cur:
        rows.append(cur)
    R = len(rows)
    X = np.full((R, seq_len), pad_id, np.int64)
    Y = np.full((R, seq_len), -100, np.int64)
    S = np.zeros((R, seq_len), np.int64)
    for i, row in enumerate(rows):
        o = 0
        for j, (x, y) in enumerate(row):
            X[i, o:o + len(x)], Y[i, o:o + len(x)], S[i, o:o + len(x)] = x, y, j
            o += len(x)
        S[i, o:] = len(row)
    return PackedRows(X, Y, S)


@dataclass
class SFTData:
    """What the trainer needs from its data (the DataBundle fields it reads, plus the packed rows)."""

    rows_train: PackedRows
    rows_val: PackedRows
    tokenizer: object
    corpus_hash: str
    token_bytes: np.ndarray
    n_docs: tuple
    stats: dict = field(default_factory=dict)

    @property
    def train(self) -> np.ndarray:  # token count in logs (trained targets)
        return self.rows_train.y[self.rows_train.y != -100]

    @property
    def val(self) -> np.ndarray:
        return self.rows_val.y[self.rows_val.y != -100]

    def sampler(self, batch_size: int, grad_accum: int, seed: int, rank: int = 0, world: int = 1) -> "PackedSampler":
        return PackedSampler(self.rows_train, batch_size, grad_accum, seed, rank, world)

    def eval_batches(self, batch_size: int, max_tokens: Optional[int] = None):
        """(x, y, cu_seqlens) batches over the held-out rows, in order (the first rows holding max_tokens targets)."""
        rv, seen = self.rows_val, 0
        for s in range(0, len(rv), batch_size):
            e = min(len(rv), s + batch_size)
            yield (torch.from_numpy(rv.x[s:e]), torch.from_numpy(rv.y[s:e]), cu_seqlens_of(torch.from_numpy(rv.seg[s:e])))
            seen += int((rv.y[s:e] != -100).sum())
            if max_tokens is not None and seen >= max_tokens:
                return


    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 4, max_tokens: Optional[int] = None, autocast=None) -> dict:
        """Held-out loss (nats per loss token), perplexity and bits per byte (UTF-8 bytes of the loss tokens)."""
        tb = torch.from_numpy(self.token_bytes)
        dev = next(model.parameters()).device
        nll, ntok, nbytes, t0 = 0.0, 0, 0, time.perf_counter()
        for x, y, cu in self.eval_batches(batch_size, max_tokens):
            with autocast() if autocast else contextlib.nullcontext():
                nll += float(model(x.to(dev), y.to(dev), reduction="sum", cu_seqlens=cu.to(dev)))
            keep = y[y != -100]
            ntok += keep.numel()
            nbytes += int(tb[keep].sum())
        loss = nll / max(ntok, 1)
        return dict(loss=loss, ppl=math.exp(min(loss, 50.0)), bpb=nll / math.log(2) / max(nbytes, 1), tokens=ntok,
                    bytes=nbytes, eval_s=time.perf_counter() - t0)


class PackedSampler:
    """batch(step, micro) -> (x, y, cu_seqlens): rows of a per-epoch permutation keyed by (seed, epoch), split across
    ranks; a function of (step, micro) only, so a resumed run draws the same batches."""

    def __init__(self, rows: PackedRows, batch_size: int, grad_accum: int, seed: int, rank: int, world: int):
        if len(rows) < 1:
            raise CorpusError("data: the training split is empty")
        self.rows, self.B, self.ga, self.seed, self.rank, self.world = rows, batch_size, grad_accum, seed, rank, world
        self._perm = {}

    def _perm_of(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch, 0x5F7]).permutation(len(self.rows))}
        return self._perm[epoch]

    def batch(self, step: int, micro: int = 0):
        R = len(self.rows)
        base = ((step * self.ga + micro) * self.world + self.rank) * self.B
        idx = np.array([self._perm_of((base + j) // R)[(base + j) % R] for j in range(self.B)])
        r = self.rows
        return torch.from_numpy(r.x[idx]), torch.from_numpy(r.y[idx]), cu_seqlens_of(torch.from_numpy(r.seg[idx]))


def corpus_records(corpus: str, include_tests: bool = False, text_field: str = "text") -> list[Record]:
    """The documents of a trainer corpus ("stdlib", a directory, .txt, .jsonl) as text records."""
    docs, _ = load_documents(corpus, include_tests, text_field)
    return [Record("text", d.text, str(d.key)) for d in docs if d.text]


def prepare_sft(path, tokenizer, seq_len: int, val_fraction: float = 0.05, train_on: str = "completion",
                text_field: str = "text", strict: bool = False, log: Callable[[str], None] = print,
                records: Optional[list] = None) -> SFTData:
    """Read, tokenize, mask, split and pack `path` (see the module docstring); `records` instead of reading
    path (then path only names the data in messages and the hash)."""
    if train_on not in ("completion", "all"):
        raise CorpusError(f"data: train_on must be 'completion' or 'all', got {train_on!r}")
    recs = records if records is not None else read_records(path, text_field)
    docs, truncated = [], 0
    for r in recs:
        ids, trained = tokenize_record(r, tokenizer, train_on)
        x, y = ids[:-1], np.where(trained[1:], ids[1:], -100)
        if r.kind == "text":  # plain language modelling: long documents are cut into rows, nothing dropped
            pieces = [(x[s:s + seq_len], y[s:s + seq_len]) for s in range(0, len(x), seq_len)]
        else:
            if len(x) > seq_len:
                msg = f"data: {r.where}: {len(x) + 1} tokens exceed seq_len {seq_len}"
                if strict:
                    raise CorpusError(msg + " (strict)")
                truncated += 1
                x, y = x[:seq_len], y[:seq_len]
            pieces = [(x, y)]
        docs.append([(a, b) for a, b in pieces if len(a) and (b != -100).any()])
    if truncated:
        msg = f"data: {truncated} of {len(recs)} examples longer than seq_len {seq_len} were truncated"
        log(f"WARNING: {msg}")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    k = max(2, round(1 / val_fraction))
    held = {i for i in range(len(docs)) if i % k == k - 1} or ({len(docs) - 1} if len(docs) >= 2 else set())
    val_docs = [p for i, d in enumerate(docs) if i in held for p in d]
    train_docs = [p for i, d in enumerate(docs) if i not in held for p in d]
    if not train_docs or not val_docs:
        raise CorpusError(f"data: {path}: {len(recs)} record(s) are too few for a training and a held-out split "
                          f"(val_fraction {val_fraction})")
    pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    rt, rv = pack(train_docs, seq_len, pad), pack(val_docs, seq_len, pad)
    h = hashlib.sha256(Path(path).read_bytes() if records is None else
                       "\0".join(str(r.value) for r in recs).encode())
    h.update(json.dumps([seq_len, val_fraction, train_on, text_field, recs[0].kind]).encode())
    stats = dict(format=recs[0].kind, records=len(recs), train_rows=len(rt), val_rows=len(rv),
                 train_targets=int((rt.y != -100).sum()), val_targets=int((rv.y != -100).sum()),
                 loss_fraction=float((rt.y != -100).mean()), truncated=truncated)
    log(f"data {path}: {stats['format']}, {len(recs)} records -> {len(rt)} training rows / {len(rv)} held-out rows of "
        f"{seq_len} tokens ({stats['train_targets']:,} / {stats['val_targets']:,} loss tokens; train_on {train_on})")
    return SFTData(rt, rv, tokenizer, h.hexdigest(), tokenizer.token_bytes(),
                   (len(docs) - len(held), len(held)), stats)

