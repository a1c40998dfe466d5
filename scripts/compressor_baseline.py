"""The compressor yardstick for a corpus the trainer accepts: xz -9e / bzip2 -9 / zlib -9 bits per byte of the
validation split, alone and with the training split in front of it as context (fmkernels/data/compressor.py).

    .venv/bin/python scripts/compressor_baseline.py                      # the embedded stdlib corpus
    .venv/bin/python scripts/compressor_baseline.py --corpus notes.txt --val_fraction 0.1 --json out.json
"""
import argparse
import json
import sys
import time

from fmkernels.data import CorpusError
from fmkernels.data.compressor import COMPRESSORS, compressor_baseline, format_baseline


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="stdlib", help="'stdlib', a directory, a .txt or a .jsonl (default: stdlib)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="validation share, as the trainer's (default 0.05)")
    p.add_argument("--stdlib_tests", action="store_true", help="include the stdlib's test folders")
    p.add_argument("--text_field", default="text", help="JSON Lines text field (default: text)")
    p.add_argument("--methods", default="xz,bz2,zlib", help=f"comma list of {','.join(COMPRESSORS)}")
    p.add_argument("--no_cache", action="store_true", help="recompute instead of reading the cached figures")
    p.add_argument("--json", help="also write the result to this JSON file")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        r = compressor_baseline(a.corpus, a.val_fraction, a.stdlib_tests, a.text_field,
                                [m for m in a.methods.split(",") if m], use_cache=not a.no_cache)
    except (CorpusError, ValueError) as e:
        print(f"compressor_baseline: {e}", file=sys.stderr)
        return 2
    print(f"corpus {a.corpus} ({r['corpus_hash'][:16]}): train {r['train_bytes']:,} bytes, "
          f"validation {r['val_bytes']:,} bytes ({time.perf_counter() - t0:.1f} s)")
    for line in format_baseline(r):
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
