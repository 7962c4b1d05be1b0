"""Launch csrc/cuda/swiglu.cu on 2-D (rows, N) views with contiguous columns; the op in
llmkern/ops/swiglu.py checked them (rows may be strided: the halves of a fused projection)."""

from __future__ import annotations

import torch

from .. import _backend
from .._cuda_bridge import dtype_code, on_device, ptr, stream


def _row_stride(t: torch.Tensor) -> int:
    """The row stride, 0 for a single row (torch leaves it arbitrary; the kernel never uses it)."""
    return t.stride(0) if t.size(0) > 1 else 0


def forward(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> None:
    """y = silu(gate) * up."""
    rows, cols = gate.shape
    with on_device(gate.device):
        _backend.cuda_module().swiglu_forward(
            ptr(gate), ptr(up), ptr(y), rows, cols,
            _row_stride(gate), _row_stride(up), _row_stride(y),
            dtype_code(gate.dtype), stream(gate.device),
        )


def backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """dgate and dup from the output gradient dy (sigmoid(gate) recomputed)."""
    rows, cols = gate.shape
    with on_device(gate.device):
        _backend.cuda_module().swiglu_backward(
            ptr(dy), ptr(gate), ptr(up), ptr(dgate), ptr(dup), rows, cols,
            _row_stride(dy), _row_stride(gate), _row_stride(up), _row_stride(dgate), _row_stride(dup),
            dtype_code(gate.dtype), stream(gate.device),
        )
