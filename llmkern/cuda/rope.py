"""Launch csrc/cuda/rope.cu on (B, H, S, D) tensors; the op in llmkern/ops/rope.py checked them
(x and y contiguous in the last dim; cos and sin float32 of one shape, last dim contiguous)."""

from __future__ import annotations

import torch

from .. import _backend
from .._cuda_bridge import dtype_code, on_device, ptr, stream


def _strides(t: torch.Tensor, dims: range) -> tuple[int, ...]:
    """t's strides over `dims`, with 0 for size-1 dims: only index 0 is ever read there, so their
    stride (which torch leaves arbitrary) must not stop the kernel's 16-byte accesses."""
    return tuple(t.stride(i) if t.size(i) > 1 else 0 for i in dims)


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """A table's (batch, position) strides; the batch stride of a shared (S, D/2) table is 0."""
    if table.dim() == 2:
        return (0, *_strides(table, range(1)))
    return _strides(table, range(2))


def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, y: torch.Tensor, inverse: bool = False) -> None:
    """y = x rotated by theta (by -theta when inverse). x, y: (B, H, S, D), contiguous last dim;
    cos, sin: float32 (S, D/2) or (B, S, D/2), contiguous last dim."""
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32:
            raise TypeError(f"the cuda RoPE kernel takes float32 {name}; got {table.dtype}")
    b, h, s, d = x.shape
    with on_device(x.device):
        _backend.cuda_module().rope_forward(
            ptr(x), ptr(cos), ptr(sin), ptr(y),
            b, h, s, d,
            _strides(x, range(3)), _strides(y, range(3)), _table_strides(cos), _table_strides(sin),
            bool(inverse), dtype_code(x.dtype), stream(x.device),
        )
