"""A short built-in demo for `make train` until the trainer lands: fits a tiny RMSNorm + linear regression
model with fmkernels ops and prints the loss. Replaced by the real trainer (fmkernels.train)."""
from __future__ import annotations

import time

import torch

import fmkernels as fk


def run_demo(steps: int = 200) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(fk.nn.RMSNorm(64), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w_true = torch.randn(64, 1)
    t0 = time.time()
    for step in range(steps):
        x = torch.randn(256, 64)
        y = torch.nn.functional.rms_norm(x, (64,)) @ w_true
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.5f}")
    print(f"demo done in {time.time() - t0:.1f}s (backend for rms_norm: {fk.info()['ops']['rms_norm']['cpu']})")
    return 0
