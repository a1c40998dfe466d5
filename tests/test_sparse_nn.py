"""SparseLinear, sparsify_, pruning criteria (magnitude, Wanda), masks through training, gradual pruning."""
import copy
import io

import pytest
import torch
from torch import nn

import fmkernels as fk
from fmkernels import testing as T
from fmkernels.nn import SparseLinear
from fmkernels.sparsity import GradualPruner, collect_act_norms, keep_masks_on_step, pruning as P, sparsity_of


def _mlp(d=64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


# ---------------------------------------------------------------- configs


def test_configs_validate_on_construction():
    with pytest.raises(ValueError, match="method must be one of"):
        fk.SemiStructuredConfig(method="random")
    with pytest.raises(ValueError, match="block_size must be 16, 32 or 64"):
        fk.BlockSparseConfig(block_size=8)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        fk.BlockSparseConfig(sparsity=1.0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        fk.UnstructuredConfig(sparsity=-0.1)
    assert fk.BlockSparseConfig().block_size == 32 and fk.BlockSparseConfig().sparsity == 0.8


# ---------------------------------------------------------------- Wanda on a hand-made case


def test_wanda_selects_by_weight_times_activation_norm():
    # one output row, one group of 4 inputs. |W| = [4, 3, 2, 1]; input channel norms [0.1, 0.1, 10, 10]
    # magnitude keeps columns 0, 1; Wanda scores |W| * ||X_j|| = [0.4, 0.3, 20, 10] keeps columns 2, 3.
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[4.0, -3.0, 2.0, -1.0]]))
    x = torch.tensor([[0.1, 0.1, 10.0, 10.0]])  # one calibration token: ||X_j|| = |x_j|
    norms = collect_act_norms(lin, [x], {"": lin})[""]
    torch.testing.assert_close(norms, x.abs()[0])
    assert P.mask_24(P.wanda_scores(lin.weight, norms)).tolist() == [[False, False, True, True]]
    assert P.mask_24(P.magnitude_scores(lin.weight)).tolist() == [[True, True, False, False]]
    # through sparsify_: the model keeps exactly Wanda's choice
    m = nn.Sequential(copy.deepcopy(lin))
    fk.sparsify_(m, fk.SemiStructuredConfig(method="wanda"), calibration=[x])
    assert m[0].dense_weight().tolist() == [[0.0, 0.0, 2.0, -1.0]]
    m = nn.Sequential(copy.deepcopy(lin))
    fk.sparsify_(m, fk.SemiStructuredConfig(method="magnitude"))
    assert m[0].dense_weight().tolist() == [[4.0, -3.0, 0.0, 0.0]]


def test_wanda_norm_is_over_all_calibration_tokens():
    lin = nn.Linear(3, 2)
    xs = [T.randn(2, 5, 3, seed=1), T.randn(4, 3, seed=2)]
    norms = collect_act_norms(lin, xs, {"l": lin})["l"]
    allx = torch.cat([xs[0].reshape(-1, 3), xs[1]])
    torch.testing.assert_close(norms, allx.norm(dim=0))


def test_wanda_unstructured_is_per_row_and_block_uses_block_sums():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    assert P.mask_unstructured(s, 0.5, per_row=True).tolist() == [[False, False, True, True], [True, True, False, False]]
    assert P.mask_unstructured(s, 0.5).tolist() == [[False, False, False, False], [True, True, True, True]]
    sc = torch.zeros(32, 64)
    sc[16:, :16] = 5.0  # block (1, 0) is the heaviest of row 1
    sc[:16, 48:] = 1.0
    bm = P.mask_blocks(sc, 16, 0.75)  # keep 1 of 4 blocks per block row
    assert bm.tolist() == [[False, False, False, True], [True, False, False, False]]


def test_wanda_needs_calibration():
    with pytest.raises(ValueError, match="needs calibration"):
        fk.sparsify_(_mlp(), fk.SemiStructuredConfig(method="wanda"))


# ---------------------------------------------------------------- sparsify_ and SparseLinear


@pytest.mark.parametrize("cfg", [fk.SemiStructuredConfig(), fk.SemiStructuredConfig(method="wanda"),
                                 fk.BlockSparseConfig(block_size=16, sparsity=0.5)], ids=str)
def test_sparsify_replaces_linears_and_matches_masked_dense(cfg):
    model = _mlp()
    x = T.randn(9, 64)
    calib = [T.randn(16, 64, seed=s) for s in range(3)]
    ref = copy.deepcopy(model)
    fk.sparsify_(model, cfg, calibration=calib)
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2))
    for i in (0, 2):
        w = model[i].dense_weight().detach()
        if isinstance(cfg, fk.SemiStructuredConfig):
            assert fk.is_24_sparse(w)
        else:
            kept = (w.reshape(w.shape[0] // 16, 16, -1, 16) != 0).any(3).any(1).float().mean().item()
            assert kept == pytest.approx(0.5)
        # kept weights are the original ones
        nz = w != 0
        assert torch.equal(w[nz], ref[i].weight.detach()[nz])
        ref[i].weight.data = w.clone()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_sparsify_filter_fn_and_unfit_shapes():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 30), nn.Linear(30, 64))
    fk.sparsify_(model, fk.SemiStructuredConfig(), filter_fn=lambda m, n: n == "0")
    assert isinstance(model[0], SparseLinear) and type(model[1]) is nn.Linear
    model2 = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 30), nn.Linear(30, 64))
    fk.sparsify_(model2, fk.SemiStructuredConfig())  # default filter skips in_features=30 (not a multiple of 4)
    assert isinstance(model2[1], SparseLinear) and type(model2[2]) is nn.Linear
    with pytest.raises(ValueError, match="does not fit"):
        fk.sparsify_(nn.Sequential(nn.Linear(30, 8)), fk.SemiStructuredConfig(), filter_fn=lambda m, n: True)
    with pytest.raises(TypeError, match="config must be"):
        fk.sparsify_(_mlp(), "2:4")


@pytest.mark.parametrize("fmt", ["2:4", "bsr"])
def test_sparse_linear_from_to_dense_state_dict(fmt):
    lin = nn.Linear(64, 32)
    mask = P.mask_24(lin.weight.abs()) if fmt == "2:4" else P.expand_block_mask(
        P.mask_blocks(lin.weight.abs(), 16, 0.5), 16)
    sl = SparseLinear.from_dense(lin, format=fmt, block_size=16, mask=mask)
    dense = sl.to_dense()
    assert torch.equal(dense.weight, lin.weight * mask)
    x = T.randn(5, 64)
    torch.testing.assert_close(sl(x), dense(x), rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(sl.state_dict(), buf)
    buf.seek(0)
    other = SparseLinear(64, 32, format=fmt, block_size=16)
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x), sl(x))
    r = repr(sl)
    assert ("format=2:4" if fmt == "2:4" else "format=bsr16") in r and "path=" in r and "last_path=" in r


def test_sparse_linear_forced_backend_runs_kernel_and_reports_path():
    lin = nn.Linear(64, 32)
    sl = SparseLinear.from_dense(lin, prune=True, backend="reference")
    x = T.randn(3, 64)
    sl(x)
    assert sl.last_path == "sparse:reference"
    sl.backend = None
    sl(x)
    assert sl.last_path in ("dense", "sparse:cpu", "sparse:reference")
    assert sl.last_path == ("dense" if sl.plan(3) == "dense" else sl.last_path)


# ---------------------------------------------------------------- training keeps the pattern


def _train(model, steps=5, opt_cls=torch.optim.AdamW, **kw):
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    hook = keep_masks_on_step(opt, model)
    for s in range(steps):
        x = T.randn(8, 64, seed=s)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hook.remove()
    return model


@pytest.mark.parametrize("cfg", [fk.SemiStructuredConfig(), fk.BlockSparseConfig(block_size=16, sparsity=0.75),
                                 fk.UnstructuredConfig(sparsity=0.6)], ids=str)
@pytest.mark.parametrize("opt", ["adamw", "sgd_momentum"])
def test_pruned_positions_stay_zero_after_optimizer_steps(cfg, opt):
    model = _mlp()
    fk.sparsify_(model, cfg)
    before = {n: (m.dense_weight() if isinstance(m, SparseLinear) else m.weight).detach().clone()
              for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kw = {"weight_decay": 0.1} if opt == "adamw" else {"momentum": 0.9}
    _train(model, opt_cls=torch.optim.AdamW if opt == "adamw" else torch.optim.SGD, **kw)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = (m.dense_weight() if isinstance(m, SparseLinear) else m.weight).detach()
            pruned = before[n] == 0
            assert pruned.any() and (w[pruned] == 0).all(), f"{n}: a pruned weight came back"
            assert not torch.equal(w, before[n]), f"{n}: kept weights did not train"


def test_sparse_linear_backward_only_kept_values():
    sl = SparseLinear.from_dense(nn.Linear(64, 16), prune=True, backend="reference")
    sl(T.randn(4, 64)).sum().backward()
    assert sl.values.grad.shape == (16, 32) and sl.meta.grad is None


# ---------------------------------------------------------------- gradual pruning


def test_cubic_schedule():
    assert P.cubic_sparsity(0, 10, 110, 0.0, 0.8) == 0.0
    assert P.cubic_sparsity(110, 10, 110, 0.0, 0.8) == pytest.approx(0.8)
    assert P.cubic_sparsity(60, 10, 110, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    vals = [P.cubic_sparsity(s, 10, 110, 0.0, 0.8) for s in range(0, 130, 5)]
    assert vals == sorted(vals)


@pytest.mark.parametrize("pattern", ["unstructured", "block"])
def test_gradual_pruner_reaches_target_and_never_revives(pattern):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pr = GradualPruner(model, final_sparsity=0.75, start_step=2, end_step=12, frequency=2, pattern=pattern,
                       block_size=16, optimizer=opt)
    prev = None
    for step in range(16):
        x = T.randn(8, 64, seed=step)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pr.step(step)
        masks = [m.weight_mask.clone() for m in (model[0], model[2])] if hasattr(model[0], "weight_mask") else None
        if prev is not None and masks is not None:
            for a, b in zip(prev, masks):
                assert not (b & ~a).any(), "a pruned weight was revived"
        prev = masks
        for m in (model[0], model[2]):
            if hasattr(m, "weight_mask"):
                assert (m.weight[~m.weight_mask] == 0).all()
    assert sparsity_of(model) == pytest.approx(0.75, abs=0.01)
