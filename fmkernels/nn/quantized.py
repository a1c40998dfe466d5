"""Quantized linear layers over fmkernels.ops.quant: inference (Int8Linear, Int4Linear, Float8Linear),
quantization-aware training (QATLinear, fake quant with a straight-through estimator) and int8 training
(Int8TrainingLinear). Built by fmkernels.quantize_ / prepare_qat_ / convert_, or directly with from_float."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops.int8_weight_only_mm import int8_weight_only_mm_module, int8_weight_only_quantize, pack_int8_weight_only
from ..ops import quant as Q
from ..reference import quant as ref

__all__ = ["Int8Linear", "Int4Linear", "Int8WeightOnlyLinear", "Float8Linear", "QATLinear", "Int8TrainingLinear"]


def _check_linear(cls, linear):
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{cls.__name__}.from_float: expected an nn.Linear, got {type(linear).__name__}")


def _check_int4_group(who, group_size):
    if isinstance(group_size, bool) or group_size not in ref.INT4_GROUP_SIZES:
        raise ValueError(f"{who}: group_size must be one of {ref.INT4_GROUP_SIZES}, got {group_size!r}")


class _QuantLinearBase(nn.Module):
    """Shared: the packed-format check on load, and the optional per-input-channel smoothing (SmoothQuant / AWQ
    scales that could not be folded into a preceding layer): forward runs on x * smooth_inv (K,)."""

    _packed_dtype: torch.dtype
    _format: str

    def _init_smooth(self, smooth: bool):
        self.register_buffer("smooth_inv", torch.ones(self.in_features) if smooth else None)

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        s = self.smooth_inv
        return x if s is None else x * s.to(x.dtype)

    def _smooth_repr(self) -> str:
        return ", input smoothing (per-channel x * smooth_inv)" if self.smooth_inv is not None else ""

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) / .half() / .double() moves the quantized format (weight_* buffers: packed codes,
        fp32 scales / zeros / compensation) and smooth_inv to the new device but keeps their dtype: the kernels take
        fp32 scales, and a scale rounded to bf16 would change every output. The bias follows the activations."""
        keep = {n: b for n, b in self._buffers.items() if b is not None and (n.startswith("weight_") or n == "smooth_inv")}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        t = state_dict.get(prefix + "weight_packed")
        if t is not None and t.dtype != self._packed_dtype:
            raise ValueError(
                f"{type(self).__name__}: state_dict['{prefix}weight_packed'] has dtype {t.dtype}, but this layer "
                f"stores the {self._format} format ({self._packed_dtype}); it was saved from another quantized format"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class Int8Linear(_QuantLinearBase):
    """W8A8 linear: int8 weights (symmetric, per output channel, packed once for the VNNI kernel) and dynamic
    per-token int8 activations quantized inside the kernel; output in the input's dtype.

    state_dict: weight_packed (N/16, K/4, 16, 4) int8, weight_comp (Np,) int32, weight_scale (N,) fp32, bias."""

    _packed_dtype = torch.int8
    _format = "int8 W8A8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, backend: Optional[str] = None,
                 smooth: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self._init_smooth(smooth)
        Np, Kp = -(-out_features // 16) * 16, -(-in_features // 4) * 4
        self.register_buffer("weight_packed", torch.zeros(Np // 16, Kp // 4, 16, 4, dtype=torch.int8))
        self.register_buffer("weight_comp", torch.zeros(Np, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, backend: Optional[str] = None) -> "Int8Linear":
        _check_linear(cls, linear)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, backend=backend)
        packed, comp, scale = Q.int8_quantize_weight(linear.weight.detach().float())
        m.weight_packed, m.weight_comp, m.weight_scale = packed, comp, scale
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._smooth(x)
        return Q.int8_linear_module(x, self.weight_packed, self.weight_comp, self.weight_scale, self.bias, self.backend)

    def dequantized_weight(self) -> torch.Tensor:
        w = ref.int8_unpack_weight(self.weight_packed, self.out_features, self.in_features)
        return w.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format=int8 W8A8 (weights per-channel symmetric, activations dynamic per-token), layout=vnni16x4"
            + self._smooth_repr()
        )


class Int4Linear(_QuantLinearBase):
    """Weight-only int4 linear (W4A16): group-wise scales (and zero points, asymmetric by default) along K.

    in_features need not divide by group_size: K is zero-padded to Kp = K rounded up to the group size (zero
    weights; x is zero-padded in forward, one (M, Kp) copy).
    act_terms: 2 (default) feeds the CPU kernel ~15-bit activations (two int8 terms); 1 = W4A8, faster at large M.
    state_dict: weight_packed (Np/16, Kp/8, 16, 4) uint8, weight_scale / weight_zero (Kp/G, Np) fp32, bias
    (and smooth_inv (K,) when built with input smoothing)."""

    _packed_dtype = torch.uint8
    _format = "int4 weight-only"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = 128,
        symmetric: bool = False,
        act_terms: int = 2,
        backend: Optional[str] = None,
        smooth: bool = False,
    ):
        super().__init__()
        _check_int4_group("Int4Linear", group_size)
        if act_terms not in (1, 2):
            raise ValueError(f"Int4Linear: act_terms must be 1 or 2, got {act_terms!r}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.act_terms, self.backend = group_size, symmetric, act_terms, backend
        self._init_smooth(smooth)
        Np = -(-out_features // 16) * 16
        Kp = self.padded_in_features
        G = Kp // group_size
        self.register_buffer("weight_packed", torch.zeros(Np // 16, Kp // 8, 16, 4, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(G, Np))
        self.register_buffer("weight_zero", torch.zeros(G, Np))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def padded_in_features(self) -> int:
        return Q._ru(max(self.in_features, 1), self.group_size)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        group_size: int = 128,
        symmetric: bool = False,
        act_terms: int = 2,
        backend: Optional[str] = None,
    ) -> "Int4Linear":
        _check_linear(cls, linear)
        _check_int4_group("Int4Linear.from_float", group_size)
        w = linear.weight.detach().float()
        Kp = Q._ru(max(w.shape[1], 1), group_size)
        q, s, z = ref.quantize_int4(nn.functional.pad(w, (0, Kp - w.shape[1])), group_size, symmetric)
        return cls.from_quantized(q, s, z, linear.in_features, linear.bias, group_size=group_size, symmetric=symmetric,
                                  act_terms=act_terms, backend=backend).to(linear.weight.device)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int,
                       bias: Optional[torch.Tensor] = None, *, group_size: int, symmetric: bool = False,
                       act_terms: int = 2, backend: Optional[str] = None,
                       smooth_inv: Optional[torch.Tensor] = None) -> "Int4Linear":
        """From codes q (N, Kp) uint8 in [0, 15] and scale / zero (Kp/G, N) fp32 (W = (q - zero) * scale), Kp =
        in_features rounded up to group_size; codes of the padded columns are ignored (x is padded with zeros)."""
        N, Kp = q.shape
        m = cls(in_features, N, bias is not None, group_size=group_size, symmetric=symmetric, act_terms=act_terms,
                backend=backend, smooth=smooth_inv is not None)
        if Kp != m.padded_in_features or tuple(scale.shape) != (Kp // group_size, N) or zero.shape != scale.shape:
            raise ValueError(f"Int4Linear.from_quantized: q {tuple(q.shape)}, scale {tuple(scale.shape)}, zero "
                             f"{tuple(zero.shape)} do not fit in_features={in_features}, group_size={group_size}")
        Np = Q._ru(max(N, 1), 16)
        sp = torch.ones(scale.shape[0], Np, dtype=torch.float32, device=q.device)
        zp = torch.zeros_like(sp)
        sp[:, :N], zp[:, :N] = scale, zero
        m.weight_packed = torch.ops.fmkernels.int4_pack_weight(q) if Q._use_cpu_ext(q) else ref.int4_pack_weight(q)
        m.weight_scale, m.weight_zero = sp, zp
        if bias is not None:
            m.bias = bias.detach().float().clone()
        if smooth_inv is not None:
            m.smooth_inv = smooth_inv.detach().float().clone()
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args):
        s = state_dict.get(prefix + "weight_scale")
        Kp = self.padded_in_features
        if s is not None and s.dim() == 2 and s.shape[0] * self.group_size != Kp:
            raise ValueError(
                f"Int4Linear: state_dict['{prefix}weight_scale'] has {s.shape[0]} groups, but in_features="
                f"{self.in_features} with group_size={self.group_size} needs {Kp // self.group_size}"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._smooth(x)
        Kp = self.padded_in_features
        if Kp != self.in_features and x.dim() and x.shape[-1] == self.in_features:
            x = nn.functional.pad(x, (0, Kp - self.in_features))
        return Q.int4_mm_module(x, self.weight_packed, self.weight_scale, self.weight_zero, self.group_size,
                                self.out_features, self.bias, self.act_terms, self.backend)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) fp32, the weight the layer applies to x * smooth_inv."""
        q = ref.int4_unpack_weight(self.weight_packed, self.out_features, self.padded_in_features)
        return ref.dequantize_int4(q, self.weight_scale, self.weight_zero, self.group_size)[:, :self.in_features]

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric (zero points)"
        acts = "~15-bit (2 x int8 terms)" if self.act_terms == 2 else "int8 (W4A8)"
        pad = f" (K padded to {self.padded_in_features})" if self.padded_in_features != self.in_features else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format=int4 weight-only g{self.group_size} {kind}{pad}, kernel activations {acts}, layout=int4x8"
            + self._smooth_repr()
        )


class Int8WeightOnlyLinear(_QuantLinearBase):
    """Weight-only int8 linear (W8A16): symmetric int8 weights with per-output-channel scales (group_size=None) or
    group-wise scales along K (GGUF Q8_0: group 32). K is zero-padded to a multiple of 4 and of the group size.
    The CPU kernel feeds ~15-bit activations (two int8 terms) to VNNI; the reference backend keeps fp32.

    state_dict: weight_packed (Np/16, Kp/4, 16, 4) uint8 (= q + 128), weight_scale (Kp/G, Np) fp32, bias."""

    _packed_dtype = torch.uint8
    _format = "int8 weight-only"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: Optional[int] = None,
                 backend: Optional[str] = None, smooth: bool = False):
        super().__init__()
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size <= 0 or group_size % 4):
            raise ValueError(f"Int8WeightOnlyLinear: group_size must be None (per channel) or a positive multiple "
                             f"of 4, got {group_size!r}")
        self.in_features, self.out_features, self.group_size, self.backend = in_features, out_features, group_size, backend
        self._init_smooth(smooth)
        Np, Kp = Q._ru(max(out_features, 1), 16), self.padded_in_features
        self.register_buffer("weight_packed", torch.full((Np // 16, Kp // 4, 16, 4), 128, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(Kp // self._G, Np))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def padded_in_features(self) -> int:
        return Q._ru(max(self.in_features, 1), 4 if self.group_size is None else self.group_size)

    @property
    def _G(self) -> int:
        return self.padded_in_features if self.group_size is None else self.group_size

    @classmethod
    def from_float(cls, linear: nn.Linear, *, group_size: Optional[int] = None,
                   backend: Optional[str] = None) -> "Int8WeightOnlyLinear":
        _check_linear(cls, linear)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                backend=backend)
        m.weight_packed, m.weight_scale, _ = int8_weight_only_quantize(linear.weight.detach().float(), group_size)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m.to(linear.weight.device)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, in_features: int,
                       bias: Optional[torch.Tensor] = None, *, group_size: Optional[int] = None,
                       backend: Optional[str] = None) -> "Int8WeightOnlyLinear":
        """From codes q (N, Kp) int8 and scale (Kp/G, N) fp32 (W = q * scale), Kp = in_features padded."""
        N, Kp = q.shape
        m = cls(in_features, N, bias is not None, group_size=group_size, backend=backend)
        if q.dtype != torch.int8 or Kp != m.padded_in_features or tuple(scale.shape) != (Kp // m._G, N):
            raise ValueError(f"Int8WeightOnlyLinear.from_quantized: q {q.dtype} {tuple(q.shape)}, scale "
                             f"{tuple(scale.shape)} do not fit in_features={in_features}, group_size={group_size}")
        m.weight_packed, m.weight_scale, _ = pack_int8_weight_only(q, scale.float())
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # buffers read from _buffers directly (nn.Module.__getattr__: ~0.7 us each, ~10% of the Python cost of a
        # batch-1 call; a buffer reassigned with `m.bias = t` lands in _buffers too)
        buf = self._buffers
        s = buf.get("smooth_inv")
        if s is not None:
            x = x * s.to(x.dtype)
        Kp = self.padded_in_features
        if Kp != self.in_features and x.dim() and x.shape[-1] == self.in_features:
            x = nn.functional.pad(x, (0, Kp - self.in_features))
        G = Kp if self.group_size is None else self.group_size
        return int8_weight_only_mm_module(x, buf["weight_packed"], buf["weight_scale"], G, self.out_features,
                                             buf["bias"], self.backend)

    def dequantized_weight(self) -> torch.Tensor:
        q = ref.int8_weight_only_unpack(self.weight_packed, self.out_features, self.padded_in_features)
        return ref.dequantize_int8_weight_only(q, self.weight_scale, self._G)[:, :self.in_features]

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format=int8 weight-only {g} symmetric, kernel activations ~15-bit (2 x int8 terms), layout=wo8"
            + self._smooth_repr()
        )


class Float8Linear(_QuantLinearBase):
    """fp8 e4m3 linear: per-output-channel scaled weights, dynamic per-token fp8 activations. GPU kernels
    (CUDA sm89+/sm90, Triton); on CPU the reference runs (dequantize + fp32 matmul: correct, not fast)."""

    _packed_dtype = torch.float8_e4m3fn
    _format = "fp8 e4m3"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, backend: Optional[str] = None):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, backend: Optional[str] = None) -> "Float8Linear":
        _check_linear(cls, linear)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, backend=backend)
        m.weight_packed, m.weight_scale = Q.fp8_quantize(linear.weight.detach().float(), per_row=True)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        a, a_scale = Q.fp8_quantize(x2, per_row=True)
        y = ops.fp8_mm(a, a_scale, self.weight_packed, self.weight_scale, self.bias, out_dtype=x.dtype,
                       backend=self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format=fp8 e4m3 (weights per-channel, activations dynamic per-token)"
        )


class _STE(torch.autograd.Function):
    """Forward: the fake-quantized value; backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fq):
        return fq

    @staticmethod
    def backward(ctx, g):
        return g, None


def _fq_act_int8(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return _STE.apply(x, ref.fake_quant_per_row_int8(x2.detach()).reshape(x.shape))


class QATLinear(nn.Linear):
    """nn.Linear with fake quantization in the forward (straight-through gradients), for prepare_qat_.
    kind="int8": per-channel int8 weights + per-token int8 activations; kind="int4": group-wise int4 weights."""

    def __init__(self, in_features, out_features, bias=True, *, kind: str = "int8", group_size: int = 128,
                 symmetric: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if kind not in ("int8", "int4"):
            raise ValueError(f"QATLinear: kind must be 'int8' or 'int4', got {kind!r}")
        if kind == "int4":
            Q._check_group("QATLinear", in_features, group_size)
        self.kind, self.group_size, self.symmetric = kind, group_size, symmetric

    @classmethod
    def from_float(cls, linear: nn.Linear, *, kind="int8", group_size=128, symmetric=False) -> "QATLinear":
        _check_linear(cls, linear)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, kind=kind, group_size=group_size,
                symmetric=symmetric, device=linear.weight.device, dtype=linear.weight.dtype)
        m.weight, m.bias = linear.weight, linear.bias  # share parameters: optimizers keep working
        return m

    def fake_quant_weight(self) -> torch.Tensor:
        w = self.weight
        if self.kind == "int8":
            fq = ref.fake_quant_per_row_int8(w.detach())
        else:
            fq = ref.fake_quant_int4(w.detach(), self.group_size, self.symmetric)
        return _STE.apply(w, fq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            x = _fq_act_int8(x)
        return nn.functional.linear(x, self.fake_quant_weight(), self.bias)

    def to_quantized(self, **kw) -> nn.Module:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device)
        lin.weight, lin.bias = self.weight, self.bias
        if self.kind == "int8":
            return Int8Linear.from_float(lin, **kw)
        return Int4Linear.from_float(lin, group_size=self.group_size, symmetric=self.symmetric, **kw)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fake_quant={self.kind}" + (
            f" g{self.group_size}" if self.kind == "int4" else "")


class Int8TrainingLinear(nn.Linear):
    """nn.Linear whose forward and input-gradient matmuls run on the int8 kernel with dynamic per-row scaling;
    weight gradient in full precision; the fp32 weight is the master copy (quantized afresh every step)."""

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8TrainingLinear":
        _check_linear(cls, linear)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                dtype=linear.weight.dtype)
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_training_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 training (fwd + grad-input int8 dynamic, grad-weight fp32)"
