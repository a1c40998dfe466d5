"""The training loop: `train(cfg) -> summary dict`. The loop and its plumbing only: the model comes from a model
source (model_source.py), is transformed by the config's converters (converters.py), and loop features
(features.py: augmentation, data selection, multitask) plug in through one protocol; this file names none of them.

AdamW (fused where available) with linear warmup + cosine decay to min_lr_ratio * lr, gradient clipping,
gradient accumulation, optional bf16 autocast, activation checkpointing, torch.compile; periodic evaluation
(loss and bits per byte); atomic checkpoints with exact resume; SIGINT/SIGTERM save and exit (130 / 143);
non-finite loss or gradient norm skips the update and stops after `max_nonfinite` in a row (exit 3).
The schedule follows steps (max_steps), or training time when max_time_s is set (then a resumed run is not
bit-identical: time is not reproducible).
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..allocator import tune_cpu_allocator
from ..data import BatchSampler
from ..data.packing import document_cu_seqlens
from ..models import Transformer
from . import checkpoint as ckpt
from .config import TrainConfig
from .converters import apply_converters, build_converters
from .features import build_features, prepare_run_data
from .flops import train_flops_per_token
from .generate import run_sample
from .metrics import (CSV_FIELDS, Metrics, compressor_yardstick, eval_scope, evaluate_data, lm_eval,  # noqa: F401
                      run_title, start_line, summary_lines)
from .model_source import model_source_for
from .optim import lr_at, make_optimizer, schedule_progress, set_lr
from .parallel import (DistInfo, all_finite, all_max, all_mean, apply_activation_checkpointing, barrier, count_params,
                       full_model_state, full_optim_state, load_full_states, setup_distributed, teardown_distributed,
                       unwrap, wrap_distributed)
from .plots import plot_run
from .progress import run_progress
from .rundir import check_out_dir, finished_run, run_out_dir
from .signals import EXIT_NONFINITE, EXIT_OK, Interrupted, StopSignals, exit_code_for


class Trainer:
    """One run: `setup()` builds data, model (model source -> converters -> loop features' setup -> activation
    checkpointing -> DDP / FSDP -> compile) and optimizer, or resumes them; `run()` is the loop."""

    def __init__(self, cfg: TrainConfig, log=None):
        self.cfg = cfg
        self.info: DistInfo = setup_distributed(cfg.distributed)
        self._log = log
        cfg, self._out_note = run_out_dir(cfg, TrainConfig.out_dir)  # the default out_dir never overwrites
        self.cfg = cfg
        barrier()  # every rank chose before rank 0 creates the directory
        self.out = Path(cfg.out_dir)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(f"cuda:{self.info.local_rank}" if torch.cuda.is_available() else "cpu")
        if cfg.tune_allocator and self.device.type == "cpu":
            tune_cpu_allocator()
        self.dtype = cfg.resolved_dtype()
        self.features = build_features(cfg)

    def __getattr__(self, name):  # what a feature exposes (trainer.tasks, trainer.selection, ...)
        for f in self.__dict__.get("features", ()):
            ex = f.exposes()
            if name in ex:
                return ex[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            tqdm.write(msg)
        with open(self.out / "train.log", "a") as f:
            f.write(msg + "\n")

    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model_fn(self):
        """The unwrapped model being trained (features call it lazily: wrapping happens after their setup)."""
        return unwrap(self.model) if hasattr(self, "model") else self._bare

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict:
        """Full state dict in the checkpoint layout (collective under FSDP)."""
        return self.source.state_for_checkpoint(full_model_state(self.model, self.info.mode))

    def optim_state(self) -> dict:
        return full_optim_state(self.model, self.opt, self.info.mode)

    def load_states(self, model_sd: dict, optim_sd: Optional[dict]) -> None:
        load_full_states(self.model, self.opt, self.source.state_from_checkpoint(model_sd), optim_sd, self.info.mode)

    def save(self) -> Optional[Path]:
        model_sd = self.model_state()
        optim_sd = self.optim_state()
        path = None
        if self.info.is_main:
            state = dict(
                step=self.step, tokens=self.tokens, train_time_s=self.train_time, best_val_bpb=self.best_val_bpb,
                nonfinite_in_a_row=self.nonfinite, data_position={"sampler": "step-keyed", "step": self.step},
                scheduler={"kind": f"warmup_{self.cfg.lr_schedule}", "step": self.step, "lr": self.lr},
                config=self.cfg.to_dict(), model_config=self.mcfg.to_dict(), corpus_hash=self.data.corpus_hash,
                world=self.info.world, **self.source.checkpoint_state(),
            )
            path = ckpt.save_checkpoint(self.out, self.step, model_sd, optim_sd, state, self.data.tokenizer,
                                        keep_last=self.cfg.keep_last)
            self.last_ckpt = path
        self.last_saved_step = self.step
        barrier()
        return path

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_tokens: Optional[int]) -> tuple[float, float]:
        """(mean loss in nats per token, bits per byte) on the validation split (or its first max_tokens)."""
        model = self.model if self.info.mode == "fsdp" else unwrap(self.model)
        was_training = model.training
        model.eval()
        r = evaluate_data(model, self.data, self.cfg.batch_size, self.cfg.seq_len, self.device, self.autocast, max_tokens)
        model.train(was_training)
        return r["loss"], r["bpb"]

    def plot(self) -> Optional[Path]:
        if not self.info.is_main:
            return None
        return plot_run(self.out, run_title(self.cfg, self.mcfg))

    # ------------------------------------------------------------------ setup
    def _prepare_data(self):
        return prepare_run_data(self.cfg, self.source, self.features, self.log if self.info.is_main else (lambda m: None))

    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        check_out_dir(cfg, self.out, self.info.is_main, self._out_note, self.log)
        self.source = model_source_for(cfg)
        if self.source.describe():
            self.log(self.source.describe())
        t0 = time.perf_counter()
        if info.is_main:  # rank 0 tokenizes (and caches) first; the others read its cache
            self.data = self._prepare_data()
        barrier()
        if not info.is_main:
            self.data = self._prepare_data()
        self.data_prep_s = time.perf_counter() - t0  # tokenizer training + tokenization (or their cache): not training
        self.mcfg = self.source.model_config(cfg, self.data.tokenizer.vocab_size)
        cfg = self.cfg = self.source.record(cfg, self.mcfg, self.data.tokenizer)  # what was built, in state.json
        torch.manual_seed(cfg.seed)
        model = self.source.build(cfg, self.mcfg, self.device)
        apply_converters(model, build_converters(cfg), self.log)
        self._bare = model
        for f in self.features:
            f.setup(self)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.model = wrap_distributed(model, info)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.opt = make_optimizer(self.model, cfg, fsdp=info.mode == "fsdp", n_layers=self.mcfg.n_layers)
        if hasattr(self.data, "sampler"):  # data with its own step-keyed sampler (packed documents)
            self.sampler = self.data.sampler(cfg.batch_size, cfg.grad_accum, cfg.seed, info.rank, info.world)
        else:
            self.sampler = BatchSampler(self.data.train, cfg.seq_len, cfg.batch_size, cfg.seed, info.rank, info.world)
        for f in self.features:
            self.sampler = f.sampler(self.sampler)
        self.flops_per_step = train_flops_per_token(self.mcfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len \
            * cfg.grad_accum + sum(f.flops_per_step for f in self.features)  # per rank
        self.step, self.tokens, self.best_val_bpb, self.nonfinite = 0, 0, None, 0
        self.train_time = sum(f.upfront_time_s for f in self.features)  # e.g. offline scoring: part of the cost
        self.lr, self.last_ckpt, self.tb, self.last_saved_step = cfg.lr, None, None, None
        self.metrics = Metrics(self.out, info.is_main)
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout stream, distinct per rank
        if cfg.resume:
            if info.is_main:
                ckpt.recover(self.out)  # temporaries and set-aside copies left by a killed save
            self._resume()
        if cfg.tensorboard and info.is_main:
            self.tb = self.metrics.open_tensorboard()

    def _documents(self, y):
        """cu_seqlens of the documents in a batch (pack_mode=document, our Transformer; a loop feature that computes
        its own loss, such as multitask, reads the windows as one stream)."""
        if self.cfg.pack_mode != "document" or not isinstance(unwrap(self.model), Transformer):
            return None
        return document_cu_seqlens(y)

    def _resume(self) -> None:
        ck = ckpt.load_latest(self.out, log=self.log)
        if ck is None:
            self.log(f"--resume: no checkpoint in {self.out}, starting from scratch")
            return
        st = ck["state"]
        self.source.check_checkpoint(ck)
        if st.get("corpus_hash") != self.data.corpus_hash:
            self.log("WARNING: the checkpoint was trained on a different corpus (hash differs)")
        self.load_states(ck["model"], ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        if "cuda" in ck["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.step, self.tokens = int(st["step"]), int(st["tokens"])
        self.train_time, self.best_val_bpb = float(st["train_time_s"]), st.get("best_val_bpb")
        self.nonfinite = int(st.get("nonfinite_in_a_row", 0))
        self.last_ckpt = ck["path"]
        self.last_saved_step = self.step
        self.metrics.truncate(self.step)
        for f in self.features:
            f.on_resume(self.step)
        self.log(f"resumed from {ck['path']} at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> tuple[float, float]:
        cfg = self.cfg
        model = self.model
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y, *docs = self.sampler.batch(self.step, micro)  # a packed-document sampler adds its cu_seqlens
            cu = docs[0] if docs else self._documents(y)  # pack_mode=document: where windows split into documents
            for f in self.features:  # training batches only
                x, y = f.batch(x, y, self.step, micro)
            x, y = x.to(self.device), y.to(self.device)
            last = micro == cfg.grad_accum - 1
            sync_ctx = model.no_sync() if (self.info.mode == "ddp" and not last) else contextlib.nullcontext()
            with sync_ctx:
                with self.autocast():
                    loss = None
                    for f in self.features:
                        loss = f.loss(unwrap(model), x, y, self.step, micro)
                        if loss is not None:
                            break
                    if loss is None:
                        loss = model(x, y) if cu is None else model(x, y, cu_seqlens=cu.to(self.device))
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        loss = loss_sum / cfg.grad_accum
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        loss = all_mean(loss, self.info.world)
        if all_finite(loss, gn, self.info.world):
            self.opt.step()
            self.nonfinite = 0
        else:
            self.nonfinite += 1
            self.log(f"step {self.step}: non-finite loss {loss} / grad norm {gn}; update skipped "
                     f"({self.nonfinite} in a row, stop at {cfg.max_nonfinite})")
        self.opt.zero_grad(set_to_none=True)
        return loss, gn

    def run(self) -> dict:
        cfg, info = self.cfg, self.info
        self.setup()
        done = finished_run(cfg, self.out, self.step, self.train_time, self.log) if cfg.resume and self.last_ckpt \
            else None
        if done is not None:  # --resume of a finished run: nothing to do (its summary)
            if self.tb is not None:
                self.tb.close()
            return done
        cfg = self.cfg  # setup() records a fine-tune's real architecture / tokenizer in it
        n_params = count_params(self.model, info, self.mcfg)
        kinds = self.opt.kinds() if hasattr(self.opt, "kinds") else []  # what make_optimizer built
        self.log(start_line(cfg, self.mcfg, self.data, info, n_params, self.dtype, "muon" if "Muon" in kinds else "adamw"))
        tok_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world
        # a bar on a terminal, one line per interval otherwise (progress.py)
        pbar = run_progress(cfg, self.step, self.train_time) if info.is_main and cfg.progress else None
        exit_code, last_loss, stop_reason = EXIT_OK, float("nan"), "max_steps"
        t_window, tok_window = time.perf_counter(), 0
        self.model.train()
        with StopSignals() as sig:
            while self.step < cfg.max_steps:
                if cfg.max_time_s is not None and self.train_time >= cfg.max_time_s:
                    stop_reason = "max_time_s"
                    break
                self.lr = lr_at(cfg, self.step, schedule_progress(cfg, self.step, self.train_time))
                set_lr(self.opt, self.lr)
                t0 = time.perf_counter()
                loss, gn = self.train_step()
                dt = time.perf_counter() - t0
                self.train_time += dt
                self.step += 1
                self.tokens += tok_per_step
                tok_window += tok_per_step
                last_loss = loss
                if pbar is not None:
                    pbar.update(min(dt, max(pbar.total - pbar.n, 0)) if cfg.max_time_s is not None else 1)
                if self.nonfinite >= cfg.max_nonfinite:
                    self.log(f"stopping: {self.nonfinite} non-finite steps in a row (max_nonfinite={cfg.max_nonfinite})")
                    exit_code, stop_reason = EXIT_NONFINITE, "non-finite"
                    break
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    tps = tok_window / max(now - t_window, 1e-9)
                    t_window, tok_window = now, 0
                    self.metrics.train_row(self.step, self.train_time, self.tokens, loss, self.lr, gn, tps, self.flops())
                    for f in self.features:
                        f.on_log(self.step, unwrap(self.model))
                    if pbar is not None:
                        pbar.set_postfix(step=self.step, loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", lr=f"{self.lr:.2e}")
                if self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self._eval_and_log(cfg.eval_tokens, final=False)
                if self.step % cfg.save_every == 0:
                    try:
                        self.save()
                    except KeyboardInterrupt:  # two Ctrl-C during the save, delivered once it completed: stop
                        sig.received = signal.SIGINT
                signum = sig.agreed(info.world, all_max)
                if signum is not None:
                    try:
                        path = self.save()
                    except KeyboardInterrupt:  # a second Ctrl-C during the save, delivered once the save completed
                        path = ckpt.list_checkpoints(self.out)[-1] if self.info.is_main else None
                    self.log(f"received {signal.Signals(signum).name} at step {self.step}: checkpoint saved to {path}; exiting")
                    exit_code = exit_code_for(signum)
                    stop_reason = signal.Signals(signum).name
                    break
            if pbar is not None:
                pbar.close()
            summary = dict(step=self.step, tokens=self.tokens, train_time_s=self.train_time,
                           tokens_per_s=self.tokens / max(self.train_time, 1e-9), final_train_loss=last_loss,
                           stop_reason=stop_reason, exit_code=exit_code, params=n_params,
                           corpus_hash=self.data.corpus_hash, flops=self.flops(), data_prep_s=self.data_prep_s)
            if exit_code == EXIT_OK:
                if self.last_saved_step != self.step:
                    self.save()
                sig.immediate = True  # the checkpoint is saved: a signal now stops the evaluation and the run
                try:
                    if sig.received is not None:  # arrived during the last save
                        raise Interrupted(sig.received)
                    if cfg.final_eval:
                        t0 = time.perf_counter()
                        vl, vb = self._eval_and_log(None, final=True)
                        summary.update(val_loss=vl, val_bpb=vb, eval_time_s=time.perf_counter() - t0)
                        if cfg.yardstick and cfg.hf is None and info.is_main:  # the corpus's validation bytes
                            summary.update(compressor_yardstick(cfg.corpus, cfg.val_fraction, cfg.stdlib_tests,
                                                                cfg.text_field))
                except Interrupted as e:
                    exit_code = exit_code_for(e.args[0])
                    stop_reason = signal.Signals(e.args[0]).name
                    summary.update(exit_code=exit_code, stop_reason=stop_reason)
                    self.log(f"received {stop_reason} after the last save (final evaluation skipped or stopped): "
                             f"checkpoint {self.last_ckpt}; exiting")
            for f in self.features:
                summary.update(f.summary())
            summary.update(best_val_bpb=self.best_val_bpb, checkpoint=str(self.last_ckpt) if self.last_ckpt else None)
        if info.is_main:
            png = self.plot()
            summary["loss_curve"] = str(png) if png else None
            sample = run_sample(unwrap(self.model) if info.mode != "fsdp" else None, self.data.tokenizer, cfg) \
                if exit_code == EXIT_OK else None
            if sample is not None:
                summary["sample"] = sample
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            self._print_summary(summary)
        if self.tb is not None:
            self.tb.close()
        return summary

    def flops(self) -> float:
        """Training + scoring FLOPs so far, all ranks (selection.py's cost model)."""
        upfront = sum(f.upfront_flops for f in self.features)
        return (upfront + self.step * self.flops_per_step) * self.info.world

    def _eval_and_log(self, max_tokens, final: bool):
        vl, vb = self.evaluate(max_tokens)
        full = max_tokens is None or max_tokens >= len(self.data.val)
        # best over the periodic evals only: a subset figure and the full split's are not comparable
        if not final and (self.best_val_bpb is None or vb < self.best_val_bpb):
            self.best_val_bpb = vb
        what = "full validation split" if full else f"first {max_tokens:,} validation tokens"
        self.log(f"step {self.step}: val loss {vl:.4f}, {vb:.4f} bits/byte ({what}; {self.train_time:.0f} s trained)")
        self.metrics.eval_row(self.step, self.train_time, self.tokens, vl, vb, self.flops(), max_tokens, full)
        for f in self.features:
            f.on_eval(self.step, unwrap(self.model), (vl, vb))
        return vl, vb

    def _print_summary(self, s: dict) -> None:
        what = eval_scope(self.cfg.eval_tokens, len(self.data.val))
        extra = [x for f in self.features for x in f.summary_lines(s)]
        for line in summary_lines(s, self.out, self.cfg.sample_prompt, extra, what):
            self.log(line)


def train(cfg: TrainConfig, log=None) -> dict:
    t = Trainer(cfg, log=log)
    try:
        summary = t.run()
    except BaseException:
        teardown_distributed(sync=False)
        raise
    teardown_distributed()
    return summary
