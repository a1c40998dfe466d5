"""One Muon optimizer step over the block matrices of `make train`'s model (preset small: dim 256, 4 layers; 16
matrices of 4 shapes: wqkv 768x256, wo 256x256, w13 1408x256, w2 256x704): fmkernels' BatchedMuon (same-shaped
matrices orthogonalized by one bf16 bmm chain) vs torch.optim.Muon (one chain per matrix), same groups, same
settings (Nesterov, 5 quintic Newton-Schulz iterations in bf16, adjust_lr_fn match_rms_adamw). FLOPs: the
Newton-Schulz matmuls (per iteration 4 r^2 c + 2 r^3 for an r x c matrix with r <= c)."""
import pytest
import torch

from benchmarks.harness import measure
from fmkernels.models import Transformer, TransformerConfig
from fmkernels.train.muon import BatchedMuon
from fmkernels.train.optim import is_muon_param

NS_STEPS = 5


def _params():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=256, n_layers=4, n_heads=4, max_seq_len=256, vocab_size=4096,
                                          qk_norm=True))
    ps = [p for n, p in model.named_parameters() if is_muon_param(n, p)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _flops(ps):
    total = 0
    for p in ps:
        r, c = sorted(p.shape)
        total += NS_STEPS * (4 * r * r * c + 2 * r ** 3)
    return total


@pytest.mark.parametrize("impl", ["fmkernels BatchedMuon", "torch.optim.Muon"])
def test_muon_step(benchmark, impl):
    ps = _params()
    cls = BatchedMuon if impl.startswith("fmkernels") else torch.optim.Muon
    opt = cls(ps, lr=3e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=NS_STEPS,
              adjust_lr_fn="match_rms_adamw")
    measure(benchmark, opt.step, group="muon step, preset small (16 matrices)", label=impl, flops=_flops(ps),
            peak="bf16_gflops", peer=impl.startswith("torch"))
