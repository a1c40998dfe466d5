"""The `fmk` command: fmk info | bench | train (more subcommands arrive with the trainer)."""
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


def _cmd_train(args) -> int:
    from .demo import run_demo

    return run_demo(steps=args.max_steps)


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

    s = sub.add_parser("train", help="train a model (until the trainer lands: a short RMSNorm demo)")
    s.add_argument("--max_steps", "--max-steps", type=int, default=200)
    s.set_defaults(func=_cmd_train)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
