"""The `fmk` command: fmk train | finetune | merge | eval | generate | info | bench.

    fmk train                                   # the default run (what `make train` does)
    fmk train --preset tiny --max_steps 50 --out_dir DIR
    fmk train --preset tiny --max_steps 50 --out_dir DIR --resume    # continue from DIR's last checkpoint
    fmk train --config run.yaml --lr 1e-3       # YAML file, then command-line overrides of any field
    fmk finetune --from DIR --corpus NEW_CORPUS --max_steps 200 --out_dir FT   # same fields as train
    fmk finetune --from DIR --corpus NEW_CORPUS --lora_rank 8 --out_dir FT     # LoRA (--lora_base int8: QLoRA)
    fmk merge --checkpoint FT --out_dir MERGED   # LoRA adapters folded into dense weights
    fmk eval --checkpoint DIR
    fmk generate --checkpoint DIR --prompt "def " --max_new_tokens 200
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import fmkernels

    d = fmkernels.info()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        from ._info import format_info

        print(format_info(d))
    return 0


def _cmd_bench(args) -> int:
    from .bench import run_benchmarks

    return run_benchmarks(out_dir=args.out_dir, select=args.k, quick=args.quick, extra=args.pytest_args)


def _add_train_fields(s: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig, _hints

    s.add_argument("--config", dest="_config", default=None, help="YAML file of field: value (flat)")
    g = s.add_argument_group("fields (any TrainConfig field; see fmkernels/train/config.py)")
    for name in TrainConfig.field_names():
        hint = _hints()[name]
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if hint is bool:
            g.add_argument(*flags, dest=name, nargs="?", const="true", default=argparse.SUPPRESS, metavar="BOOL")
        else:
            g.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper())


def _cmd_train(args, prog: str = "fmk train") -> int:
    from .data.corpus import CorpusError
    from .models.config import ConfigError
    from .train import train
    from .train.config import TrainConfig

    from .train.checkpoint import CheckpointError

    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    try:
        cfg = TrainConfig.build(args._config, overrides)
        summary = train(cfg)
    except (ConfigError, CorpusError, CheckpointError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return int(summary.get("exit_code", 0))


def _cmd_finetune(args) -> int:
    if not getattr(args, "init_from", None):
        print("fmk finetune: --from CHECKPOINT is required (a checkpoint directory or a run directory)", file=sys.stderr)
        return 2
    return _cmd_train(args, prog="fmk finetune")


def _cmd_merge(args) -> int:
    from .models.config import ConfigError
    from .train.checkpoint import CheckpointError
    from .train.finetune import merge_checkpoint

    try:
        path = merge_checkpoint(args.checkpoint, args.out_dir)
    except (ConfigError, CheckpointError) as e:
        print(f"fmk merge: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint (dense weights): {path}")
    return 0


def _cmd_eval(args) -> int:
    from .train.evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, corpus=args.corpus, max_tokens=args.max_tokens,
                            batch_size=args.batch_size)
    print(json.dumps(r, indent=1) if args.json else
          f"{r['checkpoint']} (step {r['step']}): validation loss {r['val_loss']:.4f}, "
          f"{r['val_bpb']:.4f} bits per byte over {r['tokens']:,} tokens / {r['bytes']:,} bytes of {r['corpus']}")
    return 0


def _cmd_generate(args) -> int:
    from .train.evaluate import load_model
    from .train.generate import generate

    model, tok, _ = load_model(args.checkpoint)
    text = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed,
                    use_cache=not args.no_cache)
    print(args.prompt + text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmk", description="fmkernels: kernels and a thin trainer for transformers")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="what was built, the CPU ISA, and the backend each op uses")
    s.add_argument("--json", action="store_true", help="print the info dict as JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("bench", help="run the benchmark suite; writes bench-results/ (markdown, JSON, PNG)")
    s.add_argument("--out_dir", "--out-dir", default="bench-results")
    s.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    s.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    s.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments after --")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("train", help="pretrain a transformer (default: the embedded stdlib corpus, 5 minutes)")
    _add_train_fields(s)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("finetune", help="continue from a pretrained checkpoint on a new corpus (full, frozen, "
                       "layer-wise lr decay, LoRA); takes every train field")
    s.add_argument("--from", dest="init_from", default=argparse.SUPPRESS, metavar="CHECKPOINT",
                   help="a checkpoint directory or a run directory (its newest checkpoint)")
    _add_train_fields(s)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("merge", help="fold the LoRA adapters of a fine-tuned checkpoint into dense weights")
    s.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint dir")
    s.add_argument("--out_dir", "--out-dir", required=True, help="where the dense checkpoint is written")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint")
    s.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint dir")
    s.add_argument("--corpus", default=None, help="default: the corpus the checkpoint was trained on")
    s.add_argument("--max_tokens", "--max-tokens", type=int, default=None)
    s.add_argument("--batch_size", "--batch-size", type=int, default=16)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("generate", help="sample text from a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt", default="def ")
    s.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top_k", "--top-k", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no_cache", "--no-cache", action="store_true",
                   help="re-run the whole context for every token instead of using the KV cache")
    s.set_defaults(func=_cmd_generate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
