"""The training loop: `train(cfg) -> summary dict`.

AdamW (fused where available) with linear warmup + cosine decay to min_lr_ratio * lr, gradient clipping,
gradient accumulation, optional bf16 autocast, activation checkpointing, torch.compile; periodic evaluation
(loss and bits per byte); atomic checkpoints with exact resume; SIGINT/SIGTERM save and exit (130 / 143);
non-finite loss or gradient norm skips the update and stops after `max_nonfinite` in a row (exit 3).
The schedule follows steps (max_steps), or training time when max_time_s is set (then a resumed run is not
bit-identical: time is not reproducible).
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data import bits_per_byte, eval_windows, prepare_data
from ..models import PlainTransformer, Transformer, fmk_to_plain_state_dict, plain_to_fmk_state_dict
from . import checkpoint as ckpt
from . import hf_run
from .config import TrainConfig
from .parallel import (DistInfo, apply_activation_checkpointing, apply_transforms, setup_distributed,
                       teardown_distributed, unwrap, wrap_distributed)

EXIT_OK, EXIT_NONFINITE, EXIT_SIGINT, EXIT_SIGTERM = 0, 3, 130, 143
CSV_FIELDS = ["step", "train_time_s", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb",
              "flops"]


class NonFiniteError(RuntimeError):
    pass


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, cfg: TrainConfig, fsdp: bool, n_layers: int = 0):
    from .finetune import param_groups

    groups = param_groups(model, cfg.weight_decay, n_layers, cfg.layer_lr_decay)
    if not groups:
        from ..models.config import ConfigError

        raise ConfigError("config: every parameter is frozen (freeze_embeddings / freeze_blocks / LoRA): nothing to train")
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if not fsdp:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


class _Signals:
    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=None):
        self.cfg = cfg
        self.info: DistInfo = setup_distributed(cfg.distributed)
        self._log = log
        self.out = Path(cfg.out_dir)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(f"cuda:{self.info.local_rank}" if torch.cuda.is_available() else "cpu")
        if cfg.tune_allocator and self.device.type == "cpu":
            from ..allocator import tune_cpu_allocator

            tune_cpu_allocator()
        self.dtype = cfg.resolved_dtype()

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            from tqdm import tqdm

            tqdm.write(msg)
        with open(self.out / "train.log", "a") as f:
            f.write(msg + "\n")

    def _barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def _all_max(self, v: float) -> float:
        if dist.is_initialized() and self.info.world > 1:
            t = torch.tensor([float(v)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return float(t.item())
        return v

    def _all_mean(self, v: float) -> float:
        if dist.is_initialized() and self.info.world > 1:
            t = torch.tensor([float(v)], dtype=torch.float64)
            dist.all_reduce(t)
            return float(t.item()) / self.info.world
        return v

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict:
        """Full state dict in the fmkernels Transformer layout (collective under FSDP)."""
        if self.info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = unwrap(self.model).state_dict()
        sd = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in sd.items()}
        if self.cfg.model_impl == "plain":
            sd = plain_to_fmk_state_dict(sd, self.mcfg)
        if self.cfg.hf:
            sd = hf_run.model_state_for_checkpoint(self.cfg, sd)
        return sd

    def optim_state(self) -> dict:
        if self.info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.opt.state_dict()

    def load_states(self, model_sd: dict, optim_sd: Optional[dict]) -> None:
        if self.cfg.model_impl == "plain":
            model_sd = fmk_to_plain_state_dict(model_sd, self.mcfg)
        if self.info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, model_sd, options=opts)
            if optim_sd is not None:
                set_optimizer_state_dict(self.model, self.opt, optim_sd, options=opts)
        else:
            if self.cfg.hf:
                hf_run.load_into(unwrap(self.model), model_sd, self.cfg.lora_rank > 0)
            else:
                unwrap(self.model).load_state_dict(model_sd)
            if optim_sd is not None:
                self.opt.load_state_dict(optim_sd)

    def save(self) -> Optional[Path]:
        model_sd = self.model_state()
        optim_sd = self.optim_state()
        path = None
        if self.info.is_main:
            state = dict(
                step=self.step, tokens=self.tokens, train_time_s=self.train_time, best_val_bpb=self.best_val_bpb,
                nonfinite_in_a_row=self.nonfinite, data_position={"sampler": "step-keyed", "step": self.step},
                scheduler={"kind": "warmup_cosine", "step": self.step, "lr": self.lr},
                config=self.cfg.to_dict(), model_config=self.mcfg.to_dict(), corpus_hash=self.data.corpus_hash,
                world=self.info.world,
            )
            if self.cfg.hf:
                state.update(hf_run.checkpoint_state(self.cfg, self.source))
            path = ckpt.save_checkpoint(self.out, self.step, model_sd, optim_sd, state, self.data.tokenizer,
                                        keep_last=self.cfg.keep_last)
            self.last_ckpt = path
        self.last_saved_step = self.step
        self._barrier()
        return path

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_tokens: Optional[int]) -> tuple[float, float]:
        """(mean loss in nats per token, bits per byte) on the validation split (or its first max_tokens)."""
        model = self.model if self.info.mode == "fsdp" else unwrap(self.model)
        was_training = model.training
        model.eval()
        if self.cfg.hf:  # packed documents with label masks (fmkernels/data/sft.py)
            r = hf_run.evaluate_model(model, self.data, self.cfg.batch_size, max_tokens, self._autocast)
            if was_training:
                model.train()
            return r["val_loss"], r["val_bpb"]
        tb = torch.from_numpy(self.data.token_bytes)
        sum_nll, n_tok, n_bytes = 0.0, 0, 0
        B = self.cfg.batch_size
        xs, ys = [], []

        def flush():
            nonlocal sum_nll, n_tok, n_bytes
            if not xs:
                return
            x, y = torch.stack(xs).to(self.device), torch.stack(ys).to(self.device)
            with self._autocast():
                sum_nll += float(model(x, y, reduction="sum"))
            n_tok += y.numel()
            n_bytes += int(tb[y.cpu()].sum())
            xs.clear()
            ys.clear()

        for x, y in eval_windows(self.data.val, self.cfg.seq_len, max_tokens):
            if xs and x.shape[0] != xs[0].shape[0]:
                flush()
            xs.append(x)
            ys.append(y)
            if len(xs) == B:
                flush()
        flush()
        if was_training:
            model.train()
        return sum_nll / max(n_tok, 1), bits_per_byte(sum_nll, n_bytes)

    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    # ------------------------------------------------------------------ metrics
    def _csv_row(self, row: dict) -> None:
        if not self.info.is_main:
            return
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"):
                if row.get(k, "") != "":
                    self.tb.add_scalar(k, float(row[k]), row["step"])

    def _truncate_csv(self, step: int) -> None:
        """After a resume, drop rows logged past the checkpoint by the interrupted run."""
        path = self.out / "metrics.csv"
        if not self.info.is_main or not path.exists():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def plot(self) -> Optional[Path]:
        path = self.out / "metrics.csv"
        if not self.info.is_main or not path.exists():
            return None
        try:
            import matplotlib
        except ImportError:
            print("matplotlib is not installed (pip install fmkernels[plot]): no loss-curve PNG", flush=True)
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        tr = [(int(r["tokens"]), float(r["loss"])) for r in rows if r["loss"] not in ("", "nan")]
        va = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"] != ""]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss", lw=1)
        if va:
            ax.plot(*zip(*va), "o-", label="validation loss")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(f"{self.cfg.preset} ({self.cfg.model_impl}), {self.cfg.tokenizer} tokenizer")
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.out / "loss_curve.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    # ------------------------------------------------------------------ main
    def _check_out_dir(self) -> None:
        """A fresh run never mixes with an old one: the default out_dir is cleared, any other must be empty."""
        cfg = self.cfg
        if cfg.init_from:
            src, out = Path(cfg.init_from).resolve(), self.out.resolve()
            if src == out or out in src.parents:
                from ..models.config import ConfigError

                raise ConfigError(f"config: out_dir {cfg.out_dir!r} holds the checkpoint given to --from / init_from "
                                  f"({cfg.init_from!r}); fine-tune into another out_dir")
        if cfg.resume or not self.info.is_main:
            return
        old = [p for p in (self.out / "checkpoints", self.out / "metrics.csv") if p.exists()]
        if not old:
            return
        if cfg.out_dir == TrainConfig.out_dir:
            import shutil

            self.log(f"starting a fresh default run: clearing the previous one in {self.out}")
            for p in old + [self.out / n for n in ("summary.json", "train.log", "loss_curve.png", "tasks.csv")]:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            return
        from ..models.config import ConfigError

        raise ConfigError(f"config: out_dir {cfg.out_dir!r} already holds a run; pass --resume to continue it "
                          f"or choose another out_dir")

    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        self._check_out_dir()
        pre = None
        if cfg.init_from:
            from .finetune import load_pretrained

            pre = load_pretrained(cfg.init_from)
            self.log(f"fine-tuning from {pre['path']} (architecture and tokenizer from the checkpoint)")
        tok_dir = str(pre["tokenizer_dir"]) if pre else None
        self.source = None
        if cfg.hf:  # a pretrained Hugging Face / GGUF decoder (fmkernels/train/hf_run.py)
            self.source, self.data = hf_run.build(cfg, self.log if info.is_main else (lambda m: None))
        elif info.is_main:
            self.data = prepare_data(cfg.corpus, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.stdlib_tests,
                                     cfg.text_field, log=self.log, tokenizer_dir=tok_dir,
                                     rename_p=cfg.aug_rename, rename_seed=cfg.seed)
        self._barrier()
        if not info.is_main and not cfg.hf:
            self.data = prepare_data(cfg.corpus, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.stdlib_tests,
                                     cfg.text_field, log=lambda m: None, tokenizer_dir=tok_dir,
                                     rename_p=cfg.aug_rename, rename_seed=cfg.seed)
        if self.source is not None:
            self.mcfg = self.source.mcfg
        elif pre:
            import dataclasses

            self.mcfg = dataclasses.replace(pre["model_config"], max_seq_len=cfg.seq_len)
        else:
            self.mcfg = cfg.model_config(self.data.tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        cls = Transformer if cfg.model_impl == "fmkernels" else PlainTransformer
        model = (self.source.model if self.source is not None else cls(self.mcfg)).to(self.device)
        if pre:
            sd = pre["model"] if cfg.model_impl == "fmkernels" else fmk_to_plain_state_dict(pre["model"], self.mcfg)
            model.load_state_dict(sd)
        apply_transforms(model, cfg.int8_training, cfg.sparsity)
        if cfg.qat:
            from .compress import apply_qat

            n = apply_qat(model, cfg.qat, cfg.qat_group_size)
            self.log(f"QAT: fake {cfg.qat} quantization on {n} block linears")
        from .finetune import apply_freezing, attach_lora, trainable_summary

        frozen = apply_freezing(model, cfg.freeze_embeddings, cfg.freeze_blocks)
        if cfg.lora_rank > 0:
            wrapped = attach_lora(model, cfg)
            self.log(f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha:g} on {len(wrapped)} modules "
                     f"({cfg.lora_base} base); every other weight frozen")
        if frozen or cfg.lora_rank > 0:
            n_tr, n_all = trainable_summary(model)
            note = " (the quantized base weights are buffers, not counted)" if cfg.lora_base != "dense" else ""
            self.log(f"trainable parameters: {n_tr:,} of {n_all:,} ({100 * n_tr / max(n_all, 1):.2f}%){note}")
        self.tasks, self.task_metrics = None, None
        if cfg.tasks.replace(" ", "") != "lm":  # task heads / multitask (fmkernels/train/multitask.py)
            from ..models.config import ConfigError
            from .multitask import TaskSet

            if info.world > 1:
                raise ConfigError(f"config: tasks {cfg.tasks!r} runs on one process (world {info.world}); use tasks lm")
            self.tasks = TaskSet(cfg, self.data, model, self.device, info.rank, self.log, self.out)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.model = wrap_distributed(model, info)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.opt = make_optimizer(self.model, cfg, fsdp=info.mode == "fsdp", n_layers=self.mcfg.n_layers)
        from ..data.augment import TokenAugment

        fill = self.data.tokenizer.encode(" ")
        self.augment = TokenAugment(cfg.aug_crop, cfg.aug_token_dropout, cfg.aug_span_mask, cfg.aug_span_len,
                                    int(fill[0]) if fill else 0)
        from .selection import Selection, build_selection, train_flops_per_token

        if cfg.hf:  # packed documents: the data's own step-keyed sampler
            self.selection = Selection(self.data.sampler(cfg.batch_size, cfg.grad_accum, cfg.seed, info.rank,
                                                         info.world))
        else:
            self.selection = build_selection(cfg, self.data, self.mcfg, info, self.device,
                                             lambda: unwrap(self.model), self._autocast, self.log)
        self.sampler = self.selection.sampler
        self.flops_per_step = train_flops_per_token(self.mcfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len \
            * cfg.grad_accum + self.selection.score_flops_per_step  # per rank
        self.step, self.tokens, self.train_time, self.best_val_bpb, self.nonfinite = 0, 0, 0.0, None, 0
        self.train_time = self.selection.upfront_time_s  # offline scoring is part of the run's cost
        self.lr, self.last_ckpt, self.tb, self.last_saved_step = cfg.lr, None, None, None
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout stream, distinct per rank
        if cfg.resume:
            ck = ckpt.load_latest(self.out, log=self.log)
            if ck is None:
                self.log(f"--resume: no checkpoint in {self.out}, starting from scratch")
            else:
                st = ck["state"]
                if cfg.hf:
                    hf_run.check_fingerprint(ck, self.source)
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
                self._truncate_csv(self.step)
                if self.tasks is not None:
                    self.tasks.truncate_csv(self.step)
                self.log(f"resumed from {ck['path']} at step {self.step}")
        if cfg.tensorboard and info.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:
                from ..models.config import ConfigError

                raise ConfigError(f"config: tensorboard=true needs the tensorboard package ({e})") from e
            self.tb = SummaryWriter(str(self.out / "tb"))

    def train_step(self) -> tuple[float, float]:
        cfg = self.cfg
        model = self.model
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y, *seg = self.sampler.batch(self.step, micro)  # packed runs add document segments
            if self.augment.active:  # training batches only; keyed by (seed, step, micro, rank): resumable
                from ..data.augment import augment_batch

                rng = np.random.default_rng([cfg.seed, self.step, micro, self.info.rank, 0xA06])
                x, y = augment_batch(x, y, self.augment, rng)
            x, y = x.to(self.device), y.to(self.device)
            last = micro == cfg.grad_accum - 1
            sync_ctx = model.no_sync() if (self.info.mode == "ddp" and not last) else _null()
            with sync_ctx:
                with self._autocast():
                    if self.tasks is not None:
                        loss = self.tasks.loss(unwrap(model), self.step, micro, (x, y))
                    elif seg:
                        loss = model(x, y, segments=seg[0].to(self.device))
                    else:
                        loss = model(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        loss = loss_sum / cfg.grad_accum
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        loss = self._all_mean(loss)
        finite = math.isfinite(loss) and math.isfinite(gn)
        if self.info.world > 1:
            finite = self._all_max(0.0 if finite else 1.0) == 0.0
        if finite:
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
        n_params = sum(p.numel() for p in unwrap(self.model).parameters())
        if info.world > 1 and info.mode == "fsdp":
            n_params = self.mcfg.num_params()
        self.log(
            f"fmk train: {cfg.model_impl} model preset={cfg.preset} {n_params / 1e6:.2f}M params "
            f"(dim {self.mcfg.dim}, {self.mcfg.n_layers} layers, {self.mcfg.n_heads} heads / {self.mcfg.n_kv_heads} kv, "
            f"vocab {self.mcfg.vocab_size}); corpus {cfg.corpus} hash {self.data.corpus_hash[:16]} "
            f"({len(self.data.train):,} train / {len(self.data.val):,} val tokens, {self.data.n_docs[0]}/{self.data.n_docs[1]} docs); "
            f"world {info.world} ({info.mode}); threads {torch.get_num_threads()}; dtype {self.dtype}"
        )
        tok_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world
        pbar = None
        if info.is_main and cfg.progress:
            from tqdm import tqdm

            # A time-budgeted run (max_time_s) counts seconds of training, so the bar's ETA is real.
            if cfg.max_time_s is not None:
                pbar = tqdm(total=round(cfg.max_time_s), initial=round(self.train_time), unit="s",
                            dynamic_ncols=True, file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s "
                            "[{elapsed}<{remaining}{postfix}]")
            else:
                pbar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        exit_code, last_loss, stop_reason = EXIT_OK, float("nan"), "max_steps"
        t_window, tok_window = time.perf_counter(), 0
        self.model.train()
        with _Signals() as sig:
            while self.step < cfg.max_steps:
                if cfg.max_time_s is not None and self.train_time >= cfg.max_time_s:
                    stop_reason = "max_time_s"
                    break
                progress = self.step / cfg.max_steps
                if cfg.max_time_s is not None:
                    progress = max(progress, self.train_time / cfg.max_time_s)
                self.lr = lr_at(cfg, self.step, progress)
                for g in self.opt.param_groups:
                    g["lr"] = self.lr * g.get("lr_scale", 1.0)
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
                    self._csv_row(dict(step=self.step, train_time_s=f"{self.train_time:.3f}", tokens=self.tokens,
                                       loss=repr(loss), lr=f"{self.lr:.6g}", grad_norm=f"{gn:.4g}",
                                       tokens_per_s=f"{tps:.1f}", flops=f"{self.flops():.4g}"))
                    if self.tasks is not None:
                        self.tasks.log_train(self.step, unwrap(self.model))
                    if pbar is not None:
                        pbar.set_postfix(step=self.step, loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", lr=f"{self.lr:.2e}")
                if self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self._eval_and_log(cfg.eval_tokens, final=False)
                if self.step % cfg.save_every == 0:
                    self.save()
                signum = sig.received
                if info.world > 1:
                    signum = int(self._all_max(float(signum or 0))) or None
                if signum is not None:
                    path = self.save()
                    self.log(f"received {signal.Signals(signum).name} at step {self.step}: checkpoint saved to {path}; exiting")
                    exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
                    stop_reason = signal.Signals(signum).name
                    break
            if pbar is not None:
                pbar.close()
            summary = dict(step=self.step, tokens=self.tokens, train_time_s=self.train_time,
                           tokens_per_s=self.tokens / max(self.train_time, 1e-9), final_train_loss=last_loss,
                           stop_reason=stop_reason, exit_code=exit_code, params=n_params,
                           corpus_hash=self.data.corpus_hash, flops=self.flops(), **self.selection.summary)
            if exit_code == EXIT_OK:
                if self.last_saved_step != self.step:
                    self.save()
                if cfg.final_eval:
                    t0 = time.perf_counter()
                    vl, vb = self._eval_and_log(None, final=True)
                    summary.update(val_loss=vl, val_bpb=vb, eval_time_s=time.perf_counter() - t0)
            if self.tasks is not None:
                summary["tasks"] = self.task_metrics
            summary.update(best_val_bpb=self.best_val_bpb, checkpoint=str(self.last_ckpt) if self.last_ckpt else None)
        if info.is_main:
            png = self.plot()
            summary["loss_curve"] = str(png) if png else None
            if exit_code == EXIT_OK and cfg.sample_tokens > 0:
                from .generate import generate

                model = unwrap(self.model) if info.mode != "fsdp" else None
                if model is not None and cfg.model_impl == "fmkernels":
                    summary["sample"] = generate(model, self.data.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                                 cfg.temperature, cfg.top_k, cfg.seed)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            self._print_summary(summary)
        if self.tb is not None:
            self.tb.close()
        return summary

    def flops(self) -> float:
        """Training + scoring FLOPs so far, all ranks (selection.py's cost model)."""
        return (self.selection.upfront_flops + self.step * self.flops_per_step) * self.info.world

    def _eval_and_log(self, max_tokens, final: bool):
        vl, vb = self.evaluate(max_tokens)
        if self.best_val_bpb is None or vb < self.best_val_bpb:
            self.best_val_bpb = vb
        what = "full validation split" if max_tokens is None else f"first {max_tokens:,} validation tokens"
        self.log(f"step {self.step}: val loss {vl:.4f}, {vb:.4f} bits/byte ({what}; {self.train_time:.0f} s trained)")
        self._csv_row(dict(step=self.step, train_time_s=f"{self.train_time:.3f}", tokens=self.tokens,
                           val_loss=f"{vl:.6f}", val_bpb=f"{vb:.6f}", flops=f"{self.flops():.4g}"))
        if self.tasks is not None:
            self.task_metrics = self.tasks.evaluate(unwrap(self.model), self._autocast, self.cfg.batch_size, self.step,
                                                    (vl, vb))
        return vl, vb

    def _print_summary(self, s: dict) -> None:
        lines = [
            "", "=== fmk train summary ===",
            f"stopped: {s['stop_reason']} at step {s['step']} (exit code {s['exit_code']})",
            f"tokens seen: {s['tokens']:,} in {s['train_time_s']:.1f} s of training ({s['tokens_per_s']:,.0f} tokens/s)",
            f"final train loss: {s['final_train_loss']:.4f}",
        ]
        if "val_bpb" in s:
            lines.append(f"validation (full split): loss {s['val_loss']:.4f}, {s['val_bpb']:.4f} bits per byte")
        if s.get("best_val_bpb") is not None:
            lines.append(f"best validation bits per byte: {s['best_val_bpb']:.4f}")
        pkg = (s.get("tasks") or {}).get("pkg")
        if pkg:
            lines.append(f"task pkg: held-out accuracy {pkg['val_acc']:.4f} (balanced {pkg['balanced_acc']:.4f}) over "
                         f"{pkg['n_val']} chunks, {pkg['n_classes']} classes; majority-class baseline {pkg['majority_acc']:.4f}")
        lines.append(f"checkpoint: {s.get('checkpoint')}")
        lines.append(f"metrics: {self.out / 'metrics.csv'}; loss curve: {s.get('loss_curve')}")
        if s.get("sample") is not None:
            lines += ["--- sample ---", self.cfg.sample_prompt + s["sample"], "--------------"]
        for line in lines:
            self.log(line)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: TrainConfig, log=None) -> dict:
    t = Trainer(cfg, log=log)
    try:
        summary = t.run()
    except BaseException:
        teardown_distributed(sync=False)
        raise
    teardown_distributed()
    return summary
