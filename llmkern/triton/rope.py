"""Rotary position embedding (rotate-half convention) in Triton, forward and inverse.

Pair i of a head is (x[i], x[i + D/2]); it turns by the angle whose cos and sin are given:

    y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin

The backward pass is the same rotation by -theta (sin negated), so one kernel does both.

One program handles one (batch row, position) pair and every head of it: the cos/sin row is
loaded once and reused across the heads, and the heads of one position sit next to each other
in a fused QKV projection, so the loads are dense. The math is fp32 (fp64 for fp64 inputs);
x and y may have any strides except a contiguous last dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cuda_bridge import on_device

# Elements of one half-head tile (heads x D/2) kept in registers at once.
MAX_TILE = 4096
# Blocks on grid axis 1 (the batch) per launch: CUDA's limit for grid axes 1 and 2.
MAX_GRID_Y = 65535


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,  # input (B, H, S, D), tables (S, D/2) or (B, S, D/2), output (B, H, S, D)
    x_stride_b, x_stride_h, x_stride_s,  # strides of x in elements (the last one is 1)
    y_stride_b, y_stride_h, y_stride_s,  # strides of y in elements (the last one is 1)
    cos_stride_b, cos_stride_s,  # strides of cos in elements; the batch one is 0 for shared tables
    sin_stride_b, sin_stride_s,  # strides of sin in elements, likewise
    n_heads, half,  # H and D/2
    INVERSE: tl.constexpr,  # rotate by -theta (the backward pass)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK_H: tl.constexpr,  # heads per tile (a power of 2)
    BLOCK_D: tl.constexpr,  # pairs per tile (a power of 2)
):
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    x_row = X + b * x_stride_b + s * x_stride_s
    y_row = Y + b * y_stride_b + s * y_stride_s
    cos_row = COS + b * cos_stride_b + s * cos_stride_s
    sin_row = SIN + b * sin_stride_b + s * sin_stride_s
    for d0 in range(0, half, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < half
        cos = tl.load(cos_row + cols, mask=col_mask, other=0.0).to(COMPUTE)
        sin = tl.load(sin_row + cols, mask=col_mask, other=0.0).to(COMPUTE)
        if INVERSE:
            sin = -sin
        for h0 in range(0, n_heads, BLOCK_H):
            heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            mask = (heads < n_heads)[:, None] & col_mask[None, :]
            x1_ptr = x_row + heads[:, None] * x_stride_h + cols[None, :]
            y1_ptr = y_row + heads[:, None] * y_stride_h + cols[None, :]
            x1 = tl.load(x1_ptr, mask=mask, other=0.0).to(COMPUTE)
            x2 = tl.load(x1_ptr + half, mask=mask, other=0.0).to(COMPUTE)
            y1 = x1 * cos[None, :] - x2 * sin[None, :]
            y2 = x2 * cos[None, :] + x1 * sin[None, :]
            tl.store(y1_ptr, y1.to(Y.dtype.element_ty), mask=mask)
            tl.store(y1_ptr + half, y2.to(Y.dtype.element_ty), mask=mask)


def _tiles(n_heads: int, half: int) -> tuple[int, int, int]:
    """BLOCK_H, BLOCK_D and num_warps: the whole (heads x D/2) tile when it fits MAX_TILE."""
    block_d = min(triton.next_power_of_2(half), MAX_TILE)
    block_h = min(triton.next_power_of_2(n_heads), max(1, MAX_TILE // block_d))
    num_warps = 1 if block_h * block_d <= 256 else 2 if block_h * block_d <= 1024 else 4
    return block_h, block_d, num_warps


def _batch_and_position_strides(table: torch.Tensor) -> tuple[int, int]:
    """A table's (batch, position) strides; the batch stride of a shared (S, D/2) table is 0."""
    return (0, table.stride(0)) if table.dim() == 2 else (table.stride(0), table.stride(1))


def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, y: torch.Tensor, inverse: bool = False) -> None:
    """y = x rotated by theta (by -theta when inverse). x, y: (B, H, S, D) with a contiguous
    last dimension; cos, sin: (S, D/2) or (B, S, D/2), one shape, contiguous last dimension."""
    b, h, s, d = x.shape
    half = d // 2
    block_h, block_d, num_warps = _tiles(h, half)
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    # The batch runs on grid axis 1, which CUDA caps at 65535 blocks: a larger batch (many short
    # sequences) goes in slices. Positions stay on axis 0, which holds 2**31 - 1.
    with on_device(x.device):  # Triton launches on the current GPU, which need not be x's
        for start in range(0, b, MAX_GRID_Y):
            count = min(MAX_GRID_Y, b - start)
            x_b, y_b = x.narrow(0, start, count), y.narrow(0, start, count)
            cos_b, sin_b = (t if t.dim() == 2 else t.narrow(0, start, count) for t in (cos, sin))
            _rope_kernel[(s, count)](
                x_b, cos_b, sin_b, y_b,
                x_b.stride(0), x_b.stride(1), x_b.stride(2),
                y_b.stride(0), y_b.stride(1), y_b.stride(2),
                *_batch_and_position_strides(cos_b), *_batch_and_position_strides(sin_b),
                h, half,
                INVERSE=inverse, COMPUTE=compute, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
            )
