"""Generation speed: KV-cached decoding vs re-running the cropped context for every token (the uncached path),
same model, same prompt, alternating runs. Untrained weights (speed does not depend on them); greedy decoding.

    .venv/bin/python benchmarks/bench_generate.py [--dim 384 --layers 6 --heads 6 --vocab 8192 --seq 256 --tokens 200]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256, help="max_seq_len")
    p.add_argument("--prompt", type=int, default=20, help="prompt length in tokens")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    import torch

    from fmkernels.models import Transformer, TransformerConfig
    from fmkernels.train.generate import generate_ids

    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads,
                                      max_seq_len=a.seq))
    prompt = list(range(1, a.prompt + 1))
    best = {True: float("inf"), False: float("inf")}
    for _ in range(a.repeats):
        for use_cache in (True, False):
            t = time.perf_counter()
            generate_ids(m, prompt, a.tokens, temperature=0, use_cache=use_cache)
            best[use_cache] = min(best[use_cache], time.perf_counter() - t)
    print(f"generate {a.tokens} tokens, d{a.dim} x {a.layers} layers, vocab {a.vocab}, prompt {a.prompt}, "
          f"threads {torch.get_num_threads()} (best of {a.repeats})")
    print(f"| path | tokens/s |\n|---|---|")
    print(f"| KV cache | {a.tokens / best[True]:.1f} |\n| no cache (re-run context) | {a.tokens / best[False]:.1f} |")
    print(f"speedup: {best[False] / best[True]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
