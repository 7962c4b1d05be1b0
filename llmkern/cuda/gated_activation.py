"""Launch csrc/cuda/gated_activation.cu on 2-D (rows, N) views with contiguous columns: the kernels of
SwiGLU and GeGLU (llmkern/cuda/swiglu.py and geglu.py name them; `op` is "swiglu" or "geglu"). The ops
in llmkern/ops checked the views (rows may be strided: the halves of a fused projection)."""

from __future__ import annotations

import torch

from .. import _backend
from .._cuda_bridge import dtype_code, on_device, ptr, stream


def _row_stride(t: torch.Tensor) -> int:
    """The row stride, 0 for a single row (torch leaves it arbitrary; the kernel never uses it)."""
    return t.stride(0) if t.size(0) > 1 else 0


def forward(op: str, gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> None:
    """y = act(gate) * up, by the module's <op>_forward."""
    rows, cols = gate.shape
    with on_device(gate.device):
        getattr(_backend.cuda_module(), f"{op}_forward")(
            ptr(gate), ptr(up), ptr(y), rows, cols,
            _row_stride(gate), _row_stride(up), _row_stride(y),
            dtype_code(gate.dtype), stream(gate.device),
        )


def backward(
    op: str, dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor
) -> None:
    """dgate and dup from the output gradient dy (act(gate) recomputed), by the module's <op>_backward."""
    rows, cols = gate.shape
    with on_device(gate.device):
        getattr(_backend.cuda_module(), f"{op}_backward")(
            ptr(dy), ptr(gate), ptr(up), ptr(dgate), ptr(dup), rows, cols,
            _row_stride(dy), _row_stride(gate), _row_stride(up), _row_stride(dgate), _row_stride(dup),
            dtype_code(gate.dtype), stream(gate.device),
        )
