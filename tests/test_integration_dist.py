"""A patched model trains under DDP and FSDP2 (fully_shard) on CPU with gloo: 2 processes, tiny model.

Each rank trains the patched model and an unpatched twin on the same data; the losses must match, and after
the steps the parameters must be identical across ranks.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from fmkernels.testing import free_port

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

WORKER = textwrap.dedent(
    r"""
    import copy, os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, torch.distributed as dist
    import transformers
    import fmkernels as fk
    from fmkernels.integrations import _attention, _patch  # noqa: F401

    mode = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")

    def build(patch):
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(copy.deepcopy(cfg))
        report = fk.patch(m) if patch else None
        if mode == "ddp":
            m = torch.nn.parallel.DistributedDataParallel(m)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in m.model.layers:
                fully_shard(layer)
            fully_shard(m)
        return m, report

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(100 + rank)
        ids = torch.randint(0, 128, (2, 16), generator=g)  # one batch per rank, seen 3 times: the loss must fall
        losses = []
        for _ in range(3):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    patched, report = build(True)
    lp = train(patched)
    base, _ = build(False)
    lb = train(base)
    assert report.calls.get("attention_fused", 0) > 0, report
    torch.testing.assert_close(torch.tensor(lp), torch.tensor(lb), rtol=1e-4, atol=1e-4)
    assert lp[-1] < lp[0], lp
    # parameters agree across ranks
    for n, p in patched.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        ts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(ts, t.contiguous())
        assert torch.equal(ts[0], ts[1]), n
    dist.barrier()
    dist.destroy_process_group()
    print("RANK_OK", rank, lp, lb, flush=True)
    # gloo's teardown at interpreter exit sometimes aborts ("terminate called without an active exception",
    # torch 2.13 CPU) after all work is done: leave without running it.
    os._exit(0)
    """
)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_patched_model_trains_distributed(mode, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = []
    for rank in range(2):
        e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(script), mode], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
        assert f"RANK_OK {rank}" in out
