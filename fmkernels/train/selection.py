"""Smart data selection, a switch of the one training loop (TrainConfig.select_mode):

- "online" (Loshchilov & Hutter 2015; RHO-loss, Mindermann et al. 2022): each micro-batch draws
  ceil(batch_size / select_ratio) candidate windows, scores them with a no-grad forward of the model being
  trained, and trains on the batch_size windows with the highest score. Score = the window's mean loss, or its
  loss minus a reference model's loss on the same window when select_reference is a checkpoint (RHO-loss:
  learnable, not yet learnt; noise and already-known text score low).
- "offline": before training, the training split is cut into non-overlapping windows of seq_len + 1 tokens,
  every window is scored once by the checkpoint select_scorer (minus select_reference's loss when given), and
  only the top select_ratio fraction is sampled from.

Costs are counted, not hidden: the scoring forwards run inside the timed training step (online) or are added to
the training time before step 0 (offline), and `flops` (metrics.csv, summary) = training FLOPs + scoring FLOPs,
with forward = 2 * matmul params + 4 * n_layers * seq_len * dim per token and training = 3x forward (PaLM's
accounting, causal attention counted in full).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data import BatchSampler
from ..data.corpus import CorpusError
from ..models import Transformer
from ..models.config import ConfigError, TransformerConfig
from .flops import forward_flops_per_token, train_flops_per_token
from .model_source import load_model

MODES = ("none", "online", "offline")
# Scoring materialises fp32 logits in chunks of at most this many bytes: 1.6x faster than one fused
# linear_cross_entropy call per row at the tiny preset (B 32, T 64, V 256), equal at small (T 256, V 4096)
# (2 cores, AVX-512, loaded machine; medians of 5).
LOGITS_CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def per_example_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token loss (nats) of each row of x (B, T) against y (B, T), fp32, no gradient."""
    if hasattr(model, "hidden_states") and hasattr(model, "head_weight"):
        h = model.hidden_states(x)  # (B, T, dim)
        w = model.head_weight  # (V, dim)
        B, T = y.shape
        rows = max(1, (LOGITS_CHUNK_BYTES // 4) // max(1, T * w.shape[0]))  # rows of fp32 (T, V) logits per chunk
        out = []
        for i in range(0, B, rows):
            logits = F.linear(h[i : i + rows], w).float()  # (rows, T, V)
            nll = F.cross_entropy(logits.flatten(0, 1), y[i : i + rows].flatten(), reduction="none")
            out.append(nll.view(-1, T).mean(1))
        return torch.cat(out)
    logits = model(x)  # (B, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    return nll.view(y.shape).mean(1)


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, highest first (ties: lower index first)."""
    if scores.dim() != 1:
        raise ValueError(f"select_top: scores must be 1-D, got shape {tuple(scores.shape)}")
    if not isinstance(k, int) or not 1 <= k <= scores.numel():
        raise ValueError(f"select_top: k must be an int in [1, {scores.numel()}], got {k!r}")
    return torch.argsort(scores, descending=True, stable=True)[:k]


def n_keep(n: int, ratio: float) -> int:
    """How many of n items a selection ratio keeps (at least 1)."""
    return max(1, min(n, int(round(n * ratio))))


class Scorer:
    """score(x, y) -> (B,): the model's per-window loss, minus the reference's when one is given. Both models run
    in eval mode under `autocast`, without gradients; the training mode of `model` is restored."""

    def __init__(self, model: Callable[[], torch.nn.Module], reference: Optional[torch.nn.Module] = None,
                 autocast: Optional[Callable] = None):
        self._model, self.reference = model, reference
        self._autocast = autocast

    def _ctx(self):
        if self._autocast is None:
            return contextlib.nullcontext()
        return self._autocast()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self._model()
        was = m.training
        m.eval()
        try:
            with self._ctx():
                s = per_example_loss(m, x, y)
                if self.reference is not None:
                    s = s - per_example_loss(self.reference, x, y)
        finally:
            m.train(was)
        return s


# ---------------------------------------------------------------------------------------------------- samplers
class OnlineSelectionSampler:
    """BatchSampler interface: batch(step, micro) -> the batch_size highest-scoring of ceil(batch_size / ratio)
    candidates drawn (step-keyed, like BatchSampler) from the training split."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, ratio: float, scorer: Scorer,
                 device, seed: int = 0, rank: int = 0, world: int = 1):
        if not 0 < ratio <= 1:
            raise ValueError(f"OnlineSelectionSampler: ratio must be in (0, 1], got {ratio!r}")
        self.batch_size, self.ratio, self.scorer, self.device = batch_size, ratio, scorer, device
        self.n_candidates = math.ceil(batch_size / ratio)
        self.candidates = BatchSampler(tokens, seq_len, self.n_candidates, seed, rank, world)
        self.last_scores: Optional[torch.Tensor] = None  # (n_candidates,) of the last call
        self.last_picked: Optional[torch.Tensor] = None  # (batch_size,) indices into the candidates

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.candidates.batch(step, micro)  # (C, T) each
        scores = self.scorer(x.to(self.device), y.to(self.device)).cpu()
        idx = select_top(scores, self.batch_size)
        self.last_scores, self.last_picked = scores, idx
        return x[idx], y[idx]


class OfflineSelectionSampler:
    """batch(step, micro): batch_size windows drawn (step-keyed) from the kept windows (start offsets `starts`,
    each seq_len + 1 tokens); rank r of world draws from starts[r::world]."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        mine = np.asarray(starts, dtype=np.int64)[rank::world]
        if len(mine) == 0:
            raise CorpusError(f"data selection: no kept window for rank {rank} of {world}")
        self.tokens, self.starts, self.seq_len, self.batch_size = tokens, mine, seq_len, batch_size
        self.seed, self.rank = seed, rank

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, self.rank, 0x5E1])
        offs = self.starts[rng.integers(0, len(self.starts), size=self.batch_size)]
        T = self.seq_len
        x = torch.from_numpy(np.stack([np.asarray(self.tokens[o : o + T + 1], dtype=np.int64) for o in offs]))
        return x[:, :-1], x[:, 1:]


def window_starts(n_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets of the non-overlapping windows of seq_len + 1 tokens that fit in n_tokens."""
    n = (n_tokens - 1) // seq_len
    return np.arange(n, dtype=np.int64) * seq_len


@torch.no_grad()
def score_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, scorer: Scorer, device,
                  batch_size: int = 32) -> np.ndarray:
    """(len(starts),) score of every window tokens[s : s + seq_len + 1]."""
    out = np.empty(len(starts), dtype=np.float64)
    for i in range(0, len(starts), batch_size):
        s = starts[i : i + batch_size]
        w = torch.from_numpy(np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in s]))
        out[i : i + len(s)] = scorer(w[:, :-1].to(device), w[:, 1:].to(device)).double().cpu().numpy()
    return out


def keep_top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Positions of the top `fraction` of scores (at least one), in ascending position order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep_top_fraction: fraction must be in (0, 1], got {fraction!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"keep_top_fraction: scores must be a non-empty 1-D array, got shape {scores.shape}")
    k = n_keep(scores.size, fraction)
    order = np.argsort(-scores, kind="stable")[:k]
    return np.sort(order)


# ---------------------------------------------------------------------------------------------------- trainer hook
def load_scoring_model(path: str, field: str, tokenizer, seq_len: int, device) -> torch.nn.Module:
    """A frozen dense model from a checkpoint, checked to share the run's tokenizer and fit seq_len."""
    model, tok, _ = load_model(path)
    probe = "def f(x):\n    return x  # probe\n"
    same = (tok.vocab_size == tokenizer.vocab_size and list(tok.encode(probe)) == list(tokenizer.encode(probe))
            and np.array_equal(tok.token_bytes(), tokenizer.token_bytes()))
    if not same:
        raise ConfigError(f"config: {field} {path!r} was trained with another tokenizer (vocab {tok.vocab_size}) than "
                          f"this run (vocab {tokenizer.vocab_size}); use the same tokenizer settings, or fine-tune "
                          f"from it (--from) so the run takes its tokenizer")
    if model.cfg.max_seq_len < seq_len:
        big = Transformer(dataclasses.replace(model.cfg, max_seq_len=seq_len))
        big.load_state_dict(model.state_dict())
        model = big
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Selection:
    """What the trainer needs: a sampler, FLOPs per step spent scoring, and the one-off cost paid before step 0."""

    def __init__(self, sampler, score_flops_per_step: float = 0.0, upfront_flops: float = 0.0,
                 upfront_time_s: float = 0.0, summary: Optional[dict] = None):
        self.sampler, self.score_flops_per_step = sampler, score_flops_per_step
        self.upfront_flops, self.upfront_time_s = upfront_flops, upfront_time_s
        self.summary = summary or {}


def build_selection(cfg, data, mcfg: TransformerConfig, info, device, model_fn, autocast, log) -> Selection:
    """The sampler of a run: BatchSampler (select_mode none), or an online / offline selecting sampler."""
    mode = cfg.select_mode
    if mode == "none":
        return Selection(BatchSampler(data.train, cfg.seq_len, cfg.batch_size, cfg.seed, info.rank, info.world))
    fwd = forward_flops_per_token(mcfg, cfg.seq_len)
    ref = None
    if cfg.select_reference:
        ref = load_scoring_model(cfg.select_reference, "select_reference", data.tokenizer, cfg.seq_len, device)
        ref_fwd = forward_flops_per_token(ref.cfg, cfg.seq_len)
    n_scorers_fwd = fwd + (ref_fwd if ref is not None else 0.0)
    if mode == "online":
        sampler = OnlineSelectionSampler(data.train, cfg.seq_len, cfg.batch_size, cfg.select_ratio,
                                         Scorer(model_fn, ref, autocast), device, cfg.seed, info.rank, info.world)
        per_step = n_scorers_fwd * sampler.n_candidates * cfg.seq_len * cfg.grad_accum
        log(f"data selection: online, train on the {cfg.batch_size} highest-scoring of {sampler.n_candidates} "
            f"candidates (score = loss{' - reference loss' if ref is not None else ''}); scoring adds "
            f"{per_step / (train_flops_per_token(mcfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len * cfg.grad_accum):.2f}x "
            f"the training FLOPs of a step")
        return Selection(sampler, score_flops_per_step=per_step,
                         summary=dict(select_mode="online", select_candidates=sampler.n_candidates))
    # offline
    t0 = time.perf_counter()
    scorer_model = load_scoring_model(cfg.select_scorer, "select_scorer", data.tokenizer, cfg.seq_len, device)
    starts = window_starts(len(data.train), cfg.seq_len)
    if len(starts) == 0:
        raise CorpusError(f"data selection: the training split ({len(data.train)} tokens) holds no window of "
                          f"seq_len + 1 = {cfg.seq_len + 1} tokens")
    scores = score_windows(data.train, starts, cfg.seq_len, Scorer(lambda: scorer_model, ref, autocast), device)
    keep = keep_top_fraction(scores, cfg.select_ratio)
    dt = time.perf_counter() - t0
    flops = (forward_flops_per_token(scorer_model.cfg, cfg.seq_len) + (ref_fwd if ref is not None else 0.0)) \
        * len(starts) * cfg.seq_len
    log(f"data selection: offline, scored {len(starts):,} windows of {cfg.seq_len} tokens with {cfg.select_scorer}"
        f"{' minus ' + cfg.select_reference if ref is not None else ''} in {dt:.1f} s; keeping the top "
        f"{len(keep):,} (score {scores[keep].min():.3f} .. {scores.max():.3f}; all: mean {scores.mean():.3f})")
    sampler = OfflineSelectionSampler(data.train, starts[keep], cfg.seq_len, cfg.batch_size, cfg.seed, info.rank,
                                      info.world)
    return Selection(sampler, upfront_flops=flops, upfront_time_s=dt,
                     summary=dict(select_mode="offline", select_windows=int(len(starts)), select_kept=int(len(keep))))
