"""Ablation of `make train` (issue 22): its config with one switch changed at a time, each trained for the same
wall-clock budget, one after another, plus the plain-PyTorch anchor (models/plain.py) on the same budget; writes a
markdown table (technique, switch, steps, tokens/s, full-split bits per byte, delta vs default) into
docs/pretraining.md between the `<!-- ablation:begin -->` / `<!-- ablation:end -->` markers, and every run's
figures into RUNS_DIR/results.json.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/pretrain_ablation.py                 # all, 300 s each
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/pretrain_ablation.py --only default,muon,wsd --budget_s 60
    .venv/bin/python scripts/pretrain_ablation.py --list

Each run is `python -m fmkernels.cli train --max_time_s BUDGET --out_dir RUNS_DIR/NAME SWITCHES` in a fresh process:
the budget counts the training loop only (tokenizer training, tokenization, the final full-split evaluation and the
compressor yardstick are outside it, as in `make train`). Run it on a quiet machine: neighbours' load changes
tokens/s and so the steps each run gets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"

# (name, technique, switches): `default` is make train's config (fmkernels/train/config.py defaults)
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("default", "make train's config (fmk train with no arguments: Muon, wsd, QK-norm, document packing)", []),
    # the previous default (AdamW, cosine, no QK-norm), then each of today's techniques taken out of the default
    ("adamw_cosine", "the previous default: AdamW, cosine schedule, no QK-norm",
     ["--optimizer", "adamw", "--lr_schedule", "cosine", "--qk_norm", "false"]),
    ("no_muon", "AdamW for every parameter instead of Muon", ["--optimizer", "adamw"]),
    ("no_wsd", "cosine schedule instead of warmup-stable-decay", ["--lr_schedule", "cosine"]),
    ("no_qk_norm", "no QK-norm", ["--qk_norm", "false"]),
    ("decay04", "wsd decays over the last 40% of the run (default 20%)", ["--decay_fraction", "0.4"]),
    ("min_lr0", "the decay ends at lr 0 (default 0.1 lr)", ["--min_lr_ratio", "0"]),
    ("warmup20", "20 warmup steps (default 50)", ["--warmup_steps", "20"]),
    ("concat", "document-masked packing off (one token stream)", ["--pack_mode", "concat"]),
    ("muon_lr02", "Muon at its own lr 0.02 (Keller Jordan's scaling)", ["--muon_lr", "0.02"]),
    ("softcap", "logit soft-capping at 30 (unfused cross-entropy)", ["--logit_softcap", "30"]),
    ("vocab2048", "BPE vocabulary 2048", ["--vocab_size", "2048"]),
    ("vocab8192", "BPE vocabulary 8192", ["--vocab_size", "8192"]),
    ("medium", "wider and deeper: preset medium (dim 384, 6 layers)", ["--preset", "medium"]),
    ("narrow_deep", "dim 192, 6 layers, 4 heads", ["--dim", "192", "--n_layers", "6", "--n_heads", "4"]),
    ("untied", "untied output head", ["--tie_embeddings", "false"]),
    ("lr6e-3", "peak lr x2", ["--lr", "6e-3"]),
    ("batch32", "batch 32 windows (Muon's Newton-Schulz cost is per optimizer step: a larger batch amortizes it)",
     ["--batch_size", "32"]),
    ("seq512", "sequence 512 (batch 8: same tokens per step)", ["--seq_len", "512", "--batch_size", "8"]),
    ("fp32", "fp32 instead of bf16 autocast", ["--dtype", "fp32"]),
    ("int8", "int8 forward/backward matmuls (Muon kept explicitly: auto picks AdamW with int8 training)",
     ["--int8_training", "true", "--optimizer", "muon"]),
    # the plain-PyTorch anchor (models/plain.py: nn.Linear, SDPA, materialized logits; no packed-document path),
    # with the default's optimizer, schedule and QK-norm
    ("plain", "anchor: plain PyTorch twin, eager", ["--model_impl", "plain"]),
    ("plain_compile", "anchor: plain PyTorch twin under torch.compile", ["--model_impl", "plain", "--compile", "true"]),
]
NAMES = [v[0] for v in VARIANTS]


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(name: str, switches: list[str], budget_s: float, runs_dir: Path, common: list[str], log) -> dict:
    out = runs_dir / name
    cmd = [sys.executable, "-m", "fmkernels.cli", "train", *common, "--max_time_s", str(budget_s), "--out_dir",
           str(out), *switches]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log(f"[{name}] {shlex.join(cmd[1:])}")
    t0 = time.perf_counter()
    with open(runs_dir / f"{name}.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    row = dict(name=name, switches=switches, rc=rc, wall_s=wall, log=str(runs_dir / f"{name}.log"))
    summ = out / "summary.json"
    if rc == 0 and summ.exists():
        s = json.loads(summ.read_text())
        row.update(steps=s["step"], tokens=s["tokens"], train_time_s=s["train_time_s"],
                   tokens_per_s=s["tokens_per_s"], val_bpb=s.get("val_bpb"), val_loss=s.get("val_loss"),
                   params=s.get("params"), compressor_bpb=s.get("compressor_bpb"))
        log(f"[{name}] {row['steps']} steps, {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['val_bpb']:.4f} bits per byte (full split); {wall:.0f} s wall")
    else:
        log(f"[{name}] FAILED (exit code {rc}); see {row['log']}")
    return row


def table(rows: list[dict], technique: dict, budget_s: float, cmdline: str) -> str:
    base = next((r.get("val_bpb") for r in rows if r["name"] == "default" and r.get("val_bpb") is not None), None)
    lines = [
        f"Each row: `make train`'s config with one switch changed, {budget_s:g} s of training, one run each "
        f"({datetime.date.today().isoformat()}, {machine()}, commit {commit()}).",
        f"Command: `{cmdline}`", "",
        "| technique | switch | steps | tokens/s | full-split bits per byte | delta vs default |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        sw = "`" + " ".join(r["switches"]) + "`" if r["switches"] else "(none)"
        if r.get("val_bpb") is None:
            lines.append(f"| {r['name']} | {sw} | failed (exit code {r['rc']}) | | | |")
            continue
        delta = "" if base is None or r["name"] == "default" else f"{r['val_bpb'] - base:+.4f}"
        if base is not None and r["name"] == "default":
            delta = "0"
        lines.append(f"| {r['name']} | {sw} | {r['steps']:,} | {r['tokens_per_s']:,.0f} | {r['val_bpb']:.4f} | "
                     f"{delta} |")
    lines.append("")
    lines += [f"- {r['name']}: {technique[r['name']]}" for r in rows]
    yard = next((r["compressor_bpb"] for r in rows if r.get("compressor_bpb")), None)
    if yard and "xz" in yard:
        lines += ["", f"Yardstick on the same validation bytes: xz -9e {yard['xz']['alone']:.3f} bits per byte alone, "
                      f"{yard['xz']['with_train']:.3f} with the training split as context."]
    return "\n".join(lines)


def write_doc(doc: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    text = doc.read_text() if doc.exists() else "# Pretraining: what `make train` learns per CPU-second\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Ablation\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget_s", type=float, default=300.0, help="training seconds per run (default 300: make train's)")
    p.add_argument("--only", default=None, help=f"comma list of variants to run (default: all): {','.join(NAMES)}")
    p.add_argument("--corpus", default=None, help="corpus for every run (default: make train's, the stdlib)")
    p.add_argument("--extra", default="", help="extra fmk train arguments for every run (a quoted string)")
    p.add_argument("--runs_dir", default=None, help="where the runs go (default: runs/ablation-<time>; must not "
                   "hold runs of the same names)")
    p.add_argument("--include", default="", help="comma list of earlier RUNS_DIRs whose results.json rows join the "
                   "table (rows run now win on a name clash; each keeps its commit)")
    p.add_argument("--doc", default=str(REPO / "docs" / "pretraining.md"), help="markdown file to write the table into")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    a = p.parse_args(argv)
    technique = {n: t for n, t, _ in VARIANTS}
    if a.list:
        for n, t, sw in VARIANTS:
            print(f"{n:14s} {' '.join(sw) or '(none)':48s} {t}")
        return 0
    names = NAMES if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
    bad = [n for n in names if n not in technique]
    if bad or not names:
        print(f"pretrain_ablation: --only: unknown variant(s) {', '.join(bad) or '(none given)'}; known: "
              f"{', '.join(NAMES)}", file=sys.stderr)
        return 2
    if not a.budget_s > 0:
        print(f"pretrain_ablation: --budget_s must be > 0, got {a.budget_s}", file=sys.stderr)
        return 2
    runs_dir = Path(a.runs_dir or REPO / "runs" / f"ablation-{time.strftime('%Y%m%d-%H%M%S')}")
    taken = [n for n in names if (runs_dir / n).exists()]
    if taken:
        print(f"pretrain_ablation: --runs_dir {runs_dir} already holds runs {', '.join(taken)}; choose another",
              file=sys.stderr)
        return 2
    runs_dir.mkdir(parents=True, exist_ok=True)
    common = ["--sample_tokens", "0"] + (["--corpus", a.corpus] if a.corpus else []) + shlex.split(a.extra)
    cmdline = "python scripts/pretrain_ablation.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows = []
    switches = {n: sw for n, _, sw in VARIANTS}
    for n in names:
        rows.append(run_one(n, switches[n], a.budget_s, runs_dir, common, log))
        (runs_dir / "results.json").write_text(json.dumps(dict(budget_s=a.budget_s, machine=machine(),
                                                              commit=commit(), runs=rows), indent=1))
    earlier = []
    for d in filter(None, (x.strip() for x in a.include.split(","))):
        res = json.loads((Path(d) / "results.json").read_text())
        for r in res["runs"]:
            if r["name"] not in names and r["name"] in technique and r["name"] not in {e["name"] for e in earlier}:
                earlier.append({**r, "commit": res.get("commit"), "budget_s": res.get("budget_s")})
    order = {n: i for i, n in enumerate(NAMES)}
    rows_all = sorted(earlier + rows, key=lambda r: order[r["name"]])
    for r in earlier:
        technique[r["name"]] = f"{technique[r['name']]} (run earlier at commit {r['commit']}, {r['budget_s']:g} s)"
    body = table(rows_all, technique, a.budget_s, cmdline)
    write_doc(Path(a.doc), body)
    print(body)
    print(f"written: {a.doc}; runs: {runs_dir}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
