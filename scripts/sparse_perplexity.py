"""Model-quality cost of pruning: a small byte-level transformer trained briefly on the Python standard library
source, then perplexity dense vs one-shot pruned vs pruned + sparse fine-tuned, for 2:4 magnitude, 2:4 Wanda and
50% unstructured (magnitude). Self-contained: no downloads, CPU, a few minutes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/sparse_perplexity.py            # writes the table (markdown)
    ... --pretrain-steps 600 --finetune-steps 200 --out docs/sparsity_perplexity.md

Every Linear inside the blocks is pruned (attention qkv/out, MLP up/down); embeddings and the output head stay
dense, as in the Wanda/SparseGPT papers. Fine-tuning keeps the pattern fixed (SparseLinear stores only the kept
weights; unstructured masks are re-applied after every optimizer step).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fmkernels as fk  # noqa: E402
from fmkernels.sparsity import keep_masks_on_step, sparsity_of  # noqa: E402


def load_stdlib_bytes(limit: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts or "tests" in p.parts:
            continue
        try:
            b = p.read_bytes()
        except OSError:
            continue
        out.append(b)
        n += len(b)
        if n >= limit:
            break
    data = b"".join(out)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class ByteLM(nn.Module):
    def __init__(self, d=192, layers=4, heads=4, seq=128):
        super().__init__()
        self.emb, self.pos = nn.Embedding(256, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)

    def forward(self, idx):  # (B, T) -> (B, T, 256)
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def batches(data, batch, seq, gen):
    while True:
        i = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[j : j + seq] for j in i.tolist()])
        y = torch.stack([data[j + 1 : j + seq + 1] for j in i.tolist()])
        yield x, y


@torch.no_grad()
def evaluate(model, val, seq, n_batches=16, batch=16) -> float:
    model.eval()
    tot, cnt = 0.0, 0
    for s in range(n_batches):
        starts = [(s * batch + i) * seq for i in range(batch)]
        x = torch.stack([val[j : j + seq] for j in starts])
        y = torch.stack([val[j + 1 : j + seq + 1] for j in starts])
        tot += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        cnt += y.numel()
    model.train()
    return math.exp(tot / cnt)


def train(model, data, steps, lr, batch, seq, seed, log_every=100, tag=""):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    hook = keep_masks_on_step(opt, model)
    gen = torch.Generator().manual_seed(seed)
    it = batches(data, batch, seq, gen)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup 20 steps, cosine to 10%
            w = min(1.0, (step + 1) / 20)
            g["lr"] = lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        x, y = next(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            tok = (step + 1) * batch * seq / (time.time() - t0)
            print(f"  {tag} step {step + 1}/{steps} loss {loss.item():.3f} ({tok:,.0f} tok/s)", flush=True)
    hook.remove()
    return model


def block_linears(m, name):
    return isinstance(m, nn.Linear) and name.startswith("blocks.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=int, default=6_000_000)
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    t_start = time.time()
    data = load_stdlib_bytes(a.bytes)
    n_val = min(len(data) // 10, 16 * 16 * a.seq + a.seq + 1)
    train_data, val = data[:-n_val], data[-n_val:]
    print(f"data: {len(data):,} bytes of stdlib source ({len(train_data):,} train / {len(val):,} validation)")
    model = ByteLM(seq=a.seq)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; pretraining {a.pretrain_steps} steps")
    train(model, train_data, a.pretrain_steps, a.lr, a.batch, a.seq, a.seed, tag="dense")
    dense_ppl = evaluate(model, val, a.seq)
    print(f"dense: val perplexity {dense_ppl:.3f}")
    calib_gen = torch.Generator().manual_seed(1234)
    calib_it = batches(train_data, a.batch, a.seq, calib_gen)
    calib = [next(calib_it)[0] for _ in range(a.calib_batches)]

    rows = []
    variants = [
        ("2:4 magnitude", fk.SemiStructuredConfig(method="magnitude")),
        ("2:4 Wanda", fk.SemiStructuredConfig(method="wanda")),
        ("50% unstructured (magnitude)", fk.UnstructuredConfig(sparsity=0.5)),
    ]
    for name, cfg in variants:
        m = copy.deepcopy(model)
        fk.sparsify_(m, cfg, filter_fn=block_linears, calibration=calib if cfg.method == "wanda" else None)
        one_shot = evaluate(m, val, a.seq)
        train(m, train_data, a.finetune_steps, a.ft_lr, a.batch, a.seq, a.seed + 1, tag=name)
        tuned = evaluate(m, val, a.seq)
        # sanity: the pattern survived fine-tuning
        if isinstance(cfg, fk.UnstructuredConfig):
            assert abs(sparsity_of(m) - cfg.sparsity) < 1e-3
        print(f"{name}: one-shot {one_shot:.3f} -> fine-tuned {tuned:.3f}", flush=True)
        rows.append((name, one_shot, tuned))

    # the same budget of extra dense training, so fine-tuning gains are not just "more steps"
    d2 = train(copy.deepcopy(model), train_data, a.finetune_steps, a.ft_lr, a.batch, a.seq, a.seed + 1, tag="dense+")
    dense_more = evaluate(d2, val, a.seq)

    bpb = lambda p: math.log2(p)  # noqa: E731  (byte-level: bits per byte = log2 perplexity)
    lines = [
        f"Byte-level transformer (d=192, 4 layers, 4 heads, seq {a.seq}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
        f"{a.pretrain_steps} pretraining steps of {a.batch}x{a.seq} bytes on the Python stdlib source; validation = the last "
        f"{n_val:,} bytes; fine-tuning {a.finetune_steps} steps at lr {a.ft_lr}. Perplexity per byte (bits/byte in brackets).",
        "",
        "| model | one-shot pruned | pruned + fine-tuned |",
        "|---|---|---|",
        f"| dense | {dense_ppl:.3f} ({bpb(dense_ppl):.3f}) | {dense_more:.3f} ({bpb(dense_more):.3f}) (dense, same extra steps) |",
    ]
    for name, o, t in rows:
        lines.append(f"| {name} | {o:.3f} ({bpb(o):.3f}) | {t:.3f} ({bpb(t):.3f}) |")
    lines.append("")
    lines.append(f"Total wall time {time.time() - t_start:.0f} s (2 shared cores).")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        Path(a.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
