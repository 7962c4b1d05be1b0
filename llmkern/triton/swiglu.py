"""SwiGLU gating in Triton: y = silu(gate) * up, and its gradients.

    dup   = dy * silu(g)
    dgate = dy * up * s * (1 + g (1 - s)),   s = sigmoid(g)

The backward pass recomputes sigmoid(gate) from gate, so nothing but the two inputs is saved.
The math is fp32 (fp64 for fp64 inputs). Inputs and outputs are 2-D (rows, N) views whose rows
may be strided (gate and up are the two halves of one fused projection) but whose columns are
contiguous. A program handles one row block of BLOCK columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 2048


@triton.jit
def _forward_kernel(
    G, U, Y,  # gate, up, output: (rows, N)
    g_stride, u_stride, y_stride,  # row strides in elements
    n_cols,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    DY, G, U, DG, DU,  # output gradient, gate, up, their gradients: (rows, N)
    dy_stride, g_stride, u_stride, dg_stride, du_stride,  # row strides in elements
    n_cols,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    s = tl.sigmoid(g)
    silu = g * s
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DU + row * du_stride + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * dg_stride + cols, dgate.to(DG.dtype.element_ty), mask=mask)


def _launch_shape(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int]:
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    num_warps = 1 if block <= 256 else 4 if block <= 1024 else 8
    return (n_rows, triton.cdiv(n_cols, block)), block, num_warps


def _compute(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def forward(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> None:
    """y = silu(gate) * up, on 2-D (rows, N) views."""
    n_rows, n_cols = gate.shape
    grid, block, num_warps = _launch_shape(n_rows, n_cols)
    _forward_kernel[grid](
        gate, up, y,
        gate.stride(0), up.stride(0), y.stride(0),
        n_cols,
        COMPUTE=_compute(gate), BLOCK=block, num_warps=num_warps,
    )


def backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """dgate and dup from the output gradient dy, on 2-D (rows, N) views."""
    n_rows, n_cols = gate.shape
    grid, block, num_warps = _launch_shape(n_rows, n_cols)
    _backward_kernel[grid](
        dy, gate, up, dgate, dup,
        dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
        n_cols,
        COMPUTE=_compute(gate), BLOCK=block, num_warps=num_warps,
    )
