"""Transformer.forward(cu_seqlens=...): packed documents attend only within themselves, RoPE restarts per
document; equal to running each document alone, loss and gradients."""
import torch

from fmkernels.models.config import TransformerConfig
from fmkernels.models.transformer import Transformer


def _model():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return Transformer(cfg)


def test_packed_documents_equal_documents_alone():
    m = _model().eval()
    idx = torch.randint(0, 64, (2, 16))
    cu = torch.tensor([0, 5, 6, 16, 32], dtype=torch.int32)  # documents across the two rows, one per row start
    with torch.no_grad():
        out = m(idx, cu_seqlens=cu).reshape(-1, 64)
        flat = idx.reshape(-1)
        alone = torch.cat([m(flat[a:b][None])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


def test_packed_loss_ignores_boundary_targets_and_grads_match():
    m = _model()
    idx = torch.randint(0, 64, (1, 20))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    y = torch.randint(0, 64, (1, 20))
    y[0, 6] = -100  # the target after document 0's last token is document 1's first: ignored
    loss = m(idx, y, reduction="sum", cu_seqlens=cu)
    ref = m(idx[:, :7], y[:, :7], reduction="sum") + m(idx[:, 7:], y[:, 7:], reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    g = torch.autograd.grad(loss, list(m.parameters()))
    g_ref = torch.autograd.grad(ref, list(m.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
