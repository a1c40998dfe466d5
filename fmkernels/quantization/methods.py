"""Calibrated quantization methods on float weights (no modules are touched here):

- collect():       forward hooks over the calibration data: per-layer input statistics (abs max, abs mean, a row
                   sample, the Hessian X^T X) and which layers share an input produced by which norm.
- smoothquant_scales(): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel (Xiao et al., 2023).
- awq_scales():    activation-aware per-channel scales, s = mean|X|^a with a searched on a grid by the layer group's
                   output error after int4 quantization (Lin et al., 2024).
- gptq_int4():     GPTQ (Frantar et al., 2023): column-by-column rounding with the error spread over the remaining
                   columns through the Cholesky factor of H^-1, lazy batches of 128 columns.
- int4_rtn():      round to nearest, optionally with an MSE search over shrunk [min, max] ranges per group.
All return codes / scales in the layouts of fmkernels/reference/quant.py (int4: q (N, Kp), scale / zero (Kp/G, N)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..nn.linear import is_dense_linear

Calibration = Union[Iterable, Callable[[nn.Module], object]]

_MAX_SAMPLE_ROWS = 512


@dataclass
class LayerStats:
    k: int
    rows: int = 0
    absmax: Optional[torch.Tensor] = None  # (K,)
    abssum: Optional[torch.Tensor] = None  # (K,)
    sample: list = field(default_factory=list)  # row blocks, up to _MAX_SAMPLE_ROWS rows in all
    hessian: Optional[torch.Tensor] = None  # (K, K) fp32 sum of x^T x
    producer: Optional[str] = "?"  # fqn of the norm whose output is this layer's input in every call, else None
    group: Optional[frozenset] = None  # fqns of the layers that received the same input tensor in every call

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.rows, 1)

    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.sample)[:_MAX_SAMPLE_ROWS]


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return ("Norm" in type(m).__name__ and isinstance(w, torch.Tensor) and w.dim() == 1)


def _batches(calibration, who):
    if callable(calibration) and not isinstance(calibration, (torch.Tensor, nn.Module)):
        return None
    if isinstance(calibration, (torch.Tensor, dict, str, bytes)) or not hasattr(calibration, "__iter__"):
        raise TypeError(f"{who}: calibration must be an iterable of input batches (tensors, tuples or dicts) or a "
                        f"callable that runs the model, got {type(calibration).__name__}")
    return calibration


def _run_batch(model, batch, i, who):
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point() or batch.dtype in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                        torch.uint8, torch.bool):
            return model(batch)
        raise TypeError(f"{who}: calibration batch {i} has dtype {batch.dtype}; expected token ids (int) or float")
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"{who}: calibration batch {i} must be a tensor, a tuple or a dict, got {type(batch).__name__}")


@torch.no_grad()
def collect(model: nn.Module, layers: dict[str, nn.Linear], calibration: Calibration, *, absmax=False,
            absmean=False, sample=False, hessian=False, who="quantize_") -> dict[str, LayerStats]:
    """Run the calibration data through the model with hooks on `layers` (fqn -> nn.Linear) and on norm modules."""
    stats = {f: LayerStats(m.in_features) for f, m in layers.items()}
    norm_out: dict[int, str] = {}  # id(output tensor) -> norm fqn, for the current batch
    keep: list = []  # the outputs themselves, so their ids are not reused within a batch
    seen_input: dict[int, set] = {}  # id(input tensor) -> layer fqns, current batch
    shared_norms: set[str] = set()  # norms whose output also feeds a module that is not being quantized
    hooks = []

    def norm_hook(fqn):
        def h(mod, inp, out):
            if isinstance(out, torch.Tensor):
                norm_out[id(out)] = fqn
                keep.append(out)
        return h

    def lin_hook(fqn):
        def h(mod, inp, out):
            x = inp[0] if inp else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[-1] != mod.in_features:
                raise ValueError(f"{who}: calibration fed layer '{fqn}' an input of "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}; "
                                 f"expected a float tensor (..., {mod.in_features})")
            st = stats[fqn]
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if not torch.isfinite(x2).all():
                raise ValueError(f"{who}: calibration produced non-finite inputs at layer '{fqn}'")
            st.rows += x2.shape[0]
            if absmax:
                a = x2.abs().amax(0)
                st.absmax = a if st.absmax is None else torch.maximum(st.absmax, a)
            if absmean or absmax:
                a = x2.abs().sum(0)
                st.abssum = a if st.abssum is None else st.abssum + a
            if sample:
                have = sum(b.shape[0] for b in st.sample)
                if have < _MAX_SAMPLE_ROWS:
                    step = max(1, x2.shape[0] // 128)
                    st.sample.append(x2[::step][: _MAX_SAMPLE_ROWS - have].clone())
            if hessian:
                st.hessian = x2.t() @ x2 if st.hessian is None else st.hessian.addmm_(x2.t(), x2)
            prod = norm_out.get(id(x))
            st.producer = prod if st.producer in ("?", prod) else None
            seen_input.setdefault(id(x), set()).add(fqn)
            keep.append(x)
        return h

    def other_hook(mod, args):
        # a layer left out by filter_fn (or any other module) reading a norm's output: folding x / s into that norm
        # would change this module's input too, so that norm is not a fold target
        for a in args:
            if isinstance(a, torch.Tensor) and id(a) in norm_out:
                shared_norms.add(norm_out[id(a)])

    for fqn, m in model.named_modules():
        if fqn in layers:
            hooks.append(m.register_forward_hook(lin_hook(fqn)))
        elif _is_norm(m):
            hooks.append(m.register_forward_hook(norm_hook(fqn)))
        elif next(m.children(), None) is None:
            hooks.append(m.register_forward_pre_hook(other_hook))

    def end_batch():
        for fqns in seen_input.values():
            g = frozenset(fqns)
            for f in fqns:
                st = stats[f]
                st.group = g if st.group is None or st.group == g else frozenset([f])
        norm_out.clear()
        seen_input.clear()
        keep.clear()

    was_training = model.training
    model.eval()
    try:
        batches = _batches(calibration, who)
        if batches is None:
            try:
                calibration(model)
            except (ValueError, TypeError) as e:
                if str(e).startswith(who):
                    raise
                raise ValueError(f"{who}: the calibration callable failed: {type(e).__name__}: {e}") from e
            end_batch()
        else:
            n = 0
            for i, batch in enumerate(batches):
                try:
                    _run_batch(model, batch, i, who)
                except (ValueError, TypeError) as e:
                    if str(e).startswith(who):
                        raise
                    raise ValueError(f"{who}: calibration batch {i} ({_describe(batch)}) could not run through the "
                                     f"model: {type(e).__name__}: {e}") from e
                except (RuntimeError, IndexError) as e:
                    raise ValueError(f"{who}: calibration batch {i} ({_describe(batch)}) could not run through the "
                                     f"model (wrong shape or dtype?): {type(e).__name__}: {e}") from e
                end_batch()
                n += 1
            if n == 0:
                raise ValueError(f"{who}: calibration is empty (the iterable yielded no batches)")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [f for f, st in stats.items() if st.rows == 0]
    if missing:
        raise ValueError(f"{who}: the calibration data never reached layer(s) {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}; pass batches that run the whole model")
    for st in stats.values():
        if st.producer == "?" or st.producer in shared_norms:
            st.producer = None
    return stats


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {batch.dtype} {tuple(batch.shape)}"
    return type(batch).__name__


# ---------------------------------------------------------------- int4 round to nearest (+ MSE range search)


def int4_params(w: torch.Tensor, shrink: Optional[torch.Tensor] = None):
    """w (N, G') float rows of one group -> (scale (N,), zero (N,)) asymmetric, [min, max] (shrunk) incl. 0."""
    mn = w.amin(dim=1).clamp(max=0)
    mx = w.amax(dim=1).clamp(min=0)
    if shrink is not None:
        mn, mx = mn * shrink, mx * shrink
    scale = (mx - mn) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-mn / scale).clamp(0, 15)
    return scale, zero


def _qdq(w, scale, zero):
    q = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, 15)
    return q, (q - zero[..., None]) * scale[..., None]


def int4_rtn(w: torch.Tensor, group_size: int, mse: bool = False, x_weight: Optional[torch.Tensor] = None):
    """w (N, Kp) -> (q uint8 (N, Kp), scale (Kp/G, N), zero (Kp/G, N)).

    Plain: [min, max] widened to include 0, integer zero point. mse: per group, the candidate with the smallest
    (optionally x_weight (Kp,)-weighted) squared error among (a) that range shrunk by {1.0, 0.97, ..., 0.55} and
    (b) the group's own [min, max] shrunk about its centre with a float zero point (the format allows any fp32
    zero: llama.cpp's Q4_1 grid is this family at p = 1), refined twice HQQ-style (zero = mean(q - w / scale))."""
    N, Kp = w.shape
    ng = Kp // group_size
    wg = w.float().reshape(N, ng, group_size)
    mn = wg.amin(dim=2).clamp(max=0)
    mx = wg.amax(dim=2).clamp(min=0)
    if not mse:
        s = (mx - mn) / 15.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-mn / s).clamp(0, 15)
    else:
        xw = None if x_weight is None else x_weight.float().reshape(1, ng, group_size)
        best = torch.full((N, ng), float("inf"), device=w.device)
        s = torch.ones(N, ng, device=w.device)
        z = torch.zeros(N, ng, device=w.device)
        lo, hi = wg.amin(dim=2), wg.amax(dim=2)
        c, half = (hi + lo) / 2, (hi - lo) / 2

        def consider(cs, cz):
            nonlocal best, s, z
            _, dq = _qdq(wg, cs, cz)
            e = (dq - wg).pow(2)
            e = (e * xw if xw is not None else e).sum(2)
            better = e < best
            best = torch.where(better, e, best)
            s, z = torch.where(better, cs, s), torch.where(better, cz, z)

        for i in range(16):
            p = 1.0 - 0.03 * i
            cs = (mx - mn) * p / 15.0
            cs = torch.where(cs > 0, cs, torch.ones_like(cs))
            consider(cs, torch.round(-mn * p / cs).clamp(0, 15))
            cs = 2 * half * p / 15.0
            cs = torch.where(cs > 0, cs, torch.ones_like(cs))
            cz = -(c - half * p) / cs
            for _ in range(2):
                q = torch.round(wg / cs[..., None] + cz[..., None]).clamp(0, 15)
                consider(cs, cz)
                cz = (q - wg / cs[..., None]).mean(2)
            consider(cs, cz)
    q, _ = _qdq(wg, s, z)
    return q.to(torch.uint8).reshape(N, Kp), s.t().contiguous(), z.t().contiguous()


def int4_dequant(q, scale, zero, group_size):
    N, Kp = q.shape
    return ((q.float().reshape(N, -1, group_size) - zero.t()[..., None]) * scale.t()[..., None]).reshape(N, Kp)


def pad_k(w: torch.Tensor, multiple: int) -> torch.Tensor:
    K = w.shape[1]
    Kp = -(-max(K, 1) // multiple) * multiple
    return nn.functional.pad(w, (0, Kp - K))


# ---------------------------------------------------------------- SmoothQuant


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """(K,) scales s: x -> x / s, W -> W * s (columns); max|W_j| over all the layers that share the input."""
    wmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    a = act_absmax.float()
    s = a.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    ok = (a > 0) & (wmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-4, 1e4)


# ---------------------------------------------------------------- AWQ


@torch.no_grad()
def awq_scales(x: torch.Tensor, absmean: torch.Tensor, weights: list[torch.Tensor], group_size: int,
               grid: int = 20) -> torch.Tensor:
    """Search s = absmean^a (a in [0, 1), grid points), normalized to geometric mean 1, minimizing
    sum_i ||x W_i^T - (x / s) Q(W_i s)^T||^2 over the sample rows x (R, K). Returns s (K,) (a = 0: ones)."""
    x = x.float()
    K = x.shape[1]
    ref_out = [x @ w.float().t() for w in weights]
    m = absmean.float().clamp(min=1e-6)
    best, best_s = float("inf"), torch.ones(K, device=x.device)
    for i in range(grid):
        a = i / grid
        s = m.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, y in zip(weights, ref_out):
            ws = pad_k(w.float() * s, group_size)
            q, sc, z = int4_rtn(ws, group_size)
            wd = int4_dequant(q, sc, z, group_size)[:, :K] / s
            err += (x @ wd.t() - y).pow(2).sum().item()
        if err < best:
            best, best_s = err, s
    return best_s


# ---------------------------------------------------------------- GPTQ


@torch.no_grad()
def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int, block: int = 128, damp: float = 0.01,
              mse: bool = True):
    """w (N, K) float, hessian (K, K) = sum x^T x -> int4 codes in the padded layout (as int4_rtn). Each group's
    scale / zero come from its error-updated columns when the group starts (mse: int4_rtn's range search)."""
    N, K = w.shape
    G = group_size
    block = max(block, G) // G * G
    W = w.float().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True).float()  # (K, K) upper
    Kp = -(-K // G) * G
    ng = Kp // G
    Q = torch.zeros(N, Kp, dtype=torch.uint8, device=w.device)
    S = torch.ones(ng, N, device=w.device)
    Z = torch.zeros(ng, N, device=w.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        scale = zero = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0:
                g = col // G
                cols = W1[:, i: i + G]  # the group's current (error-updated) columns
                if mse:
                    _, sg, zg = int4_rtn(pad_k(cols, G), G, mse=True)
                    scale, zero = sg[0], zg[0]
                else:
                    scale, zero = int4_params(cols)
                S[g], Z[g] = scale, zero
            wcol = W1[:, i]
            q = torch.round(wcol / scale + zero).clamp(0, 15)
            Q[:, col] = q.to(torch.uint8)
            dq = (q - zero) * scale
            err = (wcol - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if Kp > K:  # padded columns (x is zero there): any code; the zero point's nearest
        Q[:, K:] = Z[-1].round().clamp(0, 15).to(torch.uint8)[:, None]
    return Q, S, Z
