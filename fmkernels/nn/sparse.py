from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import sparse as _sp
from ..reference import sparse as _ref

__all__ = ["SparseLinear"]

FORMATS = ("2:4", "bsr")


class SparseLinear(nn.Module):
    """A Linear layer whose weight is stored sparse: 2:4 semi-structured (`format="2:4"`) or block-sparse
    (`format="bsr"`, square blocks of `block_size`). Pruned weights are not stored, so they stay zero through
    any optimizer; gradients reach the kept weights only.

    Each call picks sparse kernel or dense matmul from the shape (`fmkernels.ops.sparse.sparse24_plan` /
    `bsr_plan`, a measured per-shape table), so the layer is never slower than the dense one it replaced;
    `repr` shows the format, the plan and the last path taken. Build with `from_dense`; `to_dense` inverts.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, format: str = "2:4",
                 block_size: int = 32, nnz_blocks: int = 0, device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"SparseLinear: format must be one of {FORMATS}, got {format!r}")
        self.in_features, self.out_features, self.format, self.backend = in_features, out_features, format, backend
        dtype = dtype or torch.get_default_dtype()
        if format == "2:4":
            if in_features % 4:
                raise ValueError(f"SparseLinear: in_features={in_features} must be a multiple of 4 for 2:4")
            self.block_size = None
            self.values = nn.Parameter(torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
            pos = torch.tensor([0, 1], dtype=torch.int64, device=device).repeat(out_features, in_features // 4)
            self.register_buffer("meta", _ref.pack_meta(pos).to(device))  # positions (0, 1) in every group
        else:
            _sp._check_block_size("SparseLinear", block_size)
            if in_features % block_size or out_features % block_size:
                raise ValueError(f"SparseLinear: in/out features ({in_features}, {out_features}) must be multiples "
                                 f"of block_size={block_size}")
            self.block_size = block_size
            self.blocks = nn.Parameter(torch.zeros(nnz_blocks, block_size, block_size, device=device, dtype=dtype))
            self.register_buffer("row_ptr", torch.zeros(out_features // block_size + 1, dtype=torch.int32, device=device))
            self.register_buffer("col_idx", torch.zeros(nnz_blocks, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.last_path = None  # "sparse:<backend>" or "dense" after a forward
        self._dense_cache = None

    # ------------------------------------------------------------ conversion

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear, *, format: str = "2:4", block_size: int = 32,
                   mask: Optional[torch.Tensor] = None, prune: bool = False, backend: Optional[str] = None):
        """From an nn.Linear. `mask` (out, in) bool selects the kept weights (2:4: must be 2:4; bsr: any block
        with a kept weight is kept); without a mask W must already be sparse in the format, or prune=True
        keeps the largest-magnitude 2 of 4 (2:4 only)."""
        w = linear.weight.detach()
        N, K = w.shape
        if mask is not None:
            if tuple(mask.shape) != (N, K):
                raise ValueError(f"SparseLinear.from_dense: mask must have the weight's shape {(N, K)}, got {tuple(mask.shape)}")
            w = w * mask.to(w.dtype)
        new = cls(K, N, linear.bias is not None, format=format, block_size=block_size, device=w.device,
                  dtype=w.dtype, backend=backend)
        if format == "2:4":
            values, meta = ops.compress_24(w, prune=prune)
            new.values.data.copy_(values)
            new.meta.copy_(meta)
        else:
            bm = None
            if mask is not None:
                bm = mask.reshape(N // block_size, block_size, K // block_size, block_size).any(3).any(1)
            blocks, row_ptr, col_idx = ops.compress_bsr(w, block_size, block_mask=bm)
            new.blocks = nn.Parameter(blocks.contiguous())
            new.row_ptr, new.col_idx = row_ptr, col_idx
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) dense weight (differentiable in the kept values)."""
        if self.format == "2:4":
            return _ref.decompress_24(self.values, self.meta)
        return _ref.decompress_bsr(self.blocks, self.row_ptr, self.col_idx, self.in_features)

    @property
    def density(self) -> float:
        if self.format == "2:4":
            return 0.5
        nb = (self.out_features // self.block_size) * (self.in_features // self.block_size)
        return self.blocks.shape[0] / max(1, nb)

    # ------------------------------------------------------------ forward

    def plan(self, M: int, device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> str:
        """'sparse' or 'dense' for an input with M rows (forced to sparse when a backend is given)."""
        p = self._param()
        device = device or p.device.type
        dtype = dtype or p.dtype
        if self.backend is not None:
            return "sparse"
        if self.format == "2:4":
            return _sp.sparse24_plan(M, self.out_features, self.in_features, dtype, device)
        return _sp.bsr_plan(M, self.out_features, self.in_features, self.density, dtype, device)

    def _param(self) -> torch.Tensor:
        return self.values if self.format == "2:4" else self.blocks

    def _cached_dense(self) -> torch.Tensor:
        p = self._param()
        key = (p.data_ptr(), p._version, p.dtype, p.device)
        if self._dense_cache is None or self._dense_cache[0] != key:
            with torch.no_grad():
                self._dense_cache = (key, self.dense_weight())
        return self._dense_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M = x.numel() // max(1, x.shape[-1])
        if self.plan(M, x.device.type, x.dtype) == "dense":
            self.last_path = "dense"
            grad = torch.is_grad_enabled() and self._param().requires_grad
            w = self.dense_weight() if grad else self._cached_dense()
            return F.linear(x, w, self.bias)
        if self.format == "2:4":
            y = ops.sparse24_mm(x, self.values, self.meta, self.bias, backend=self.backend)
            impl = _sp.S24
        else:
            y = ops.bsr_mm(x, self.blocks, self.row_ptr, self.col_idx, self.bias, backend=self.backend)
            impl = _sp.BSR
        q = _sp._dispatch.Query(device=x.device.type, dtype=x.dtype, shape=(M, self.out_features, self.in_features))
        self.last_path = "sparse:" + impl.select(q, self.backend).name
        return y

    # ------------------------------------------------------------ state dict (BSR nnzb varies)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the index tensors a kernel trusts are checked before they are loaded (a bad row_ptr would be read out of
        # bounds by the BSR kernel); errors are reported like a shape mismatch
        got = lambda n: state_dict.get(prefix + n)  # noqa: E731
        op = f"SparseLinear.load_state_dict ({prefix.rstrip('.') or 'root'})"
        try:
            if self.format == "2:4" and got("values") is not None and got("meta") is not None:
                _sp._check_24_format(op, got("values"), got("meta"), self.in_features)
            elif self.format == "bsr" and all(got(n) is not None for n in ("blocks", "row_ptr", "col_idx")):
                _sp._check_bsr_format(op, got("blocks"), got("row_ptr"), got("col_idx"), self.in_features)
        except (TypeError, ValueError) as e:
            error_msgs.append(str(e))
            return
        if self.format == "bsr" and prefix + "blocks" in state_dict:
            blk = state_dict[prefix + "blocks"]
            self.blocks = nn.Parameter(torch.empty_like(blk, device=self.blocks.device, dtype=self.blocks.dtype))
            self.col_idx = torch.empty(blk.shape[0], dtype=torch.int32, device=self.col_idx.device)
        self._dense_cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _plan_summary(self) -> str:
        p = self._param()
        dev, dt = p.device.type, p.dtype
        if self.backend is not None:
            return f"sparse (backend={self.backend!r} forced)"
        Ms = [m for m in (1, 16, 64, 256, 2048) if self.plan(m, dev, dt) == "sparse"]
        if not Ms:
            return "dense for every M (sparse kernel not faster here)"
        if len(Ms) == 5:
            return "sparse for every M"
        return "sparse for M in {" + ",".join(map(str, Ms)) + "}, dense otherwise"

    def extra_repr(self) -> str:
        fmt = self.format if self.format == "2:4" else f"bsr{self.block_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={fmt}, density={self.density:.2f}, path={self._plan_summary()}, last_path={self.last_path}")
