"""Loop features: what a run adds to the one training loop beyond language modelling, behind one small protocol
the trainer iterates over without naming any of them. Built in: augmentation (fmkernels/data/augment.py), data
selection (selection.py), multitask heads (multitask.py). A new feature is a `LoopFeature` and a
`register_feature` line, not an edit to the loop.

Hooks, each a no-op by default, in the order the trainer calls them:
  data_options()              extra prepare_data keyword arguments (before the data is prepared)
  setup(run)                  run: the Trainer (cfg, data, mcfg, device, info, log, out, autocast, model_fn());
                              called on the unwrapped model, after the converters, before wrapping and the optimizer
  sampler(sampler)            may replace the training batch sampler (batch(step, micro) -> (x, y))
  batch(x, y, step, micro)    transform a training batch (CPU tensors, before the copy to the device)
  loss(model, x, y, step, micro)  the micro-step's loss, or None for the model's own LM loss
  on_log(step, model) / on_eval(step, model, (val_loss, val_bpb)) / on_resume(step)
  summary() -> dict (merged into summary.json), summary_lines(summary) -> lines for the printed summary
Costs: flops_per_step, upfront_flops, upfront_time_s (counted into the run's FLOPs and training time).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..data import prepare_data
from ..data.augment import TokenAugment, augment_batch
from ..models.config import ConfigError
from .multitask import TaskSet
from .selection import build_selection


class LoopFeature:
    name = "feature"
    flops_per_step = 0.0
    upfront_flops = 0.0
    upfront_time_s = 0.0

    def data_options(self) -> dict:
        return {}

    def setup(self, run) -> None:
        pass

    def sampler(self, sampler):
        return sampler

    def batch(self, x, y, step: int, micro: int):
        return x, y

    def loss(self, model, x, y, step: int, micro: int) -> Optional[torch.Tensor]:
        return None

    def on_log(self, step: int, model) -> None:
        pass

    def on_eval(self, step: int, model, lm: tuple) -> None:
        pass

    def on_resume(self, step: int) -> None:
        pass

    def summary(self) -> dict:
        return {}

    def summary_lines(self, summary: dict) -> list[str]:
        return []

    def exposes(self) -> dict:
        """Attributes the Trainer shows for this feature (e.g. trainer.tasks), for tests and callers."""
        return {}


class Augmentation(LoopFeature):
    """Token-level augmentation of training batches (keyed by (seed, step, micro, rank): resumable) and identifier
    renaming of training documents at tokenization (aug_rename)."""

    name = "augmentation"

    def __init__(self, cfg):
        self.cfg = cfg
        self.aug = TokenAugment()
        self.rank = 0

    def data_options(self) -> dict:
        return dict(rename_p=self.cfg.aug_rename, rename_seed=self.cfg.seed)

    def setup(self, run) -> None:
        cfg = self.cfg
        fill = run.data.tokenizer.encode(" ")
        self.aug = TokenAugment(cfg.aug_crop, cfg.aug_token_dropout, cfg.aug_span_mask, cfg.aug_span_len,
                                int(fill[0]) if fill else 0)
        self.rank = run.info.rank

    def batch(self, x, y, step, micro):
        if not self.aug.active:
            return x, y
        rng = np.random.default_rng([self.cfg.seed, step, micro, self.rank, 0xA06])
        return augment_batch(x, y, self.aug, rng)

    def exposes(self) -> dict:
        return {"augment": self.aug}


class DataSelection(LoopFeature):
    """select_mode online / offline: the sampler trains on the highest-scoring windows; scoring FLOPs and time
    are counted."""

    name = "selection"

    def __init__(self, cfg):
        self.cfg = cfg
        self.sel = None

    def setup(self, run) -> None:
        self.sel = build_selection(self.cfg, run.data, run.mcfg, run.info, run.device, run.model_fn, run.autocast,
                                   run.log)
        self.flops_per_step = self.sel.score_flops_per_step
        self.upfront_flops, self.upfront_time_s = self.sel.upfront_flops, self.sel.upfront_time_s

    def sampler(self, sampler):
        return self.sel.sampler

    def summary(self) -> dict:
        return dict(self.sel.summary)

    def exposes(self) -> dict:
        return {"selection": self.sel}


class Multitask(LoopFeature):
    """tasks other than 'lm': task heads on the trunk (model.task_heads), the combined loss, per-task metrics."""

    name = "multitask"

    def __init__(self, cfg):
        self.cfg = cfg
        self.tasks: Optional[TaskSet] = None
        self.metrics = None

    def setup(self, run) -> None:
        if run.info.world > 1:
            raise ConfigError(f"config: tasks {self.cfg.tasks!r} runs on one process (world {run.info.world}); "
                              f"use tasks lm")
        self.tasks = TaskSet(self.cfg, run.data, run.model_fn(), run.device, run.info.rank, run.log, run.out)
        self.autocast = run.autocast

    def loss(self, model, x, y, step, micro):
        return self.tasks.loss(model, step, micro, (x, y))

    def on_log(self, step, model) -> None:
        self.tasks.log_train(step, model)

    def on_eval(self, step, model, lm) -> None:
        self.metrics = self.tasks.evaluate(model, self.autocast, self.cfg.batch_size, step, lm)

    def on_resume(self, step) -> None:
        self.tasks.truncate_csv(step)

    def summary(self) -> dict:
        return {"tasks": self.metrics}

    def exposes(self) -> dict:
        return {"tasks": self.tasks, "task_metrics": self.metrics}

    def summary_lines(self, s: dict) -> list[str]:
        pkg = (s.get("tasks") or {}).get("pkg")
        if not pkg:
            return []
        return [f"task pkg: held-out accuracy {pkg['val_acc']:.4f} (balanced {pkg['balanced_acc']:.4f}) over "
                f"{pkg['n_val']} chunks, {pkg['n_classes']} classes; majority-class baseline {pkg['majority_acc']:.4f}"]


# Order matters where features draw from torch's RNG at setup (task heads are initialised before a selection
# reference model is built).
_FACTORIES: list[tuple[str, Callable]] = [
    ("augmentation", lambda cfg: Augmentation(cfg)),
    ("multitask", lambda cfg: Multitask(cfg) if cfg.tasks.replace(" ", "") != "lm" else None),
    ("selection", lambda cfg: DataSelection(cfg) if cfg.select_mode != "none" else None),
]


def register_feature(name: str, factory: Callable) -> None:
    """factory(cfg) -> LoopFeature or None (off); appended after the built-in features."""
    global _FACTORIES
    _FACTORIES = [f for f in _FACTORIES if f[0] != name] + [(name, factory)]


def build_features(cfg) -> list[LoopFeature]:
    return [f for f in (make(cfg) for _, make in _FACTORIES) if f is not None]


def prepare_run_data(cfg, source, features: list, log):
    """The run's data: the model source's own (e.g. a pretrained model's packed documents, fmkernels/data/sft.py),
    else the config's corpus encoded with the source's tokenizer, with the features' extra prepare_data options."""
    opts = {}
    for f in features:
        opts.update(f.data_options())
    own = source.prepare_data(cfg, log)
    if own is not None:
        return own
    tok_dir = source.tokenizer_dir()
    return prepare_data(cfg.corpus, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.stdlib_tests, cfg.text_field,
                        log=log, tokenizer_dir=str(tok_dir) if tok_dir else None, **opts)
