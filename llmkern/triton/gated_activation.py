"""Gated activations in Triton: y = act(gate) * up, and its gradients, for SwiGLU (act = silu) and
GeGLU (act = gelu with the tanh approximation; tl has no tanh, llmkern/triton/_math.py has one);
llmkern/triton/swiglu.py and geglu.py name them.

    dup   = dy * act(g)
    dgate = dy * up * act'(g)

The activation is a constexpr of the kernels (SILU or GELU_TANH), so each is compiled on its own.
The backward pass recomputes act(gate) from gate, so nothing but the two inputs is saved.
The math is fp32 (fp64 for fp64 inputs). Inputs and outputs are 2-D (rows, N) views whose rows
may be strided (gate and up are the two halves of one fused projection) but whose columns are
contiguous. A program handles one row block of BLOCK columns: rows on grid axis 0 (up to
2**31 - 1 of them), column blocks on axis 1, which CUDA caps at 65535 blocks, so a row wider than
65535 * BLOCK columns (a 1-D input of over 134M elements is one such row) is launched in slices of
columns. Row offsets are formed in int64 (row * stride passes 2**31 in a large activation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cuda_bridge import on_device
from ._math import tanh_and_slope

MAX_BLOCK = 2048
# Blocks on grid axis 1 (column blocks) per launch: CUDA's limit for grid axes 1 and 2.
MAX_GRID_Y = 65535

# The activations (the kernels' ACTIVATION constexpr).
SILU = tl.constexpr(0)
GELU_TANH = tl.constexpr(1)


@triton.jit
def _gelu_tanh_inner(g):
    """The argument of gelu's tanh, with PyTorch's constants: sqrt(2 / pi) * (g + 0.044715 g^3)."""
    return 0.7978845608028654 * (g + 0.044715 * g * g * g)


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    if ACTIVATION == SILU:
        a = g * tl.sigmoid(g)
    else:  # GELU_TANH, as PyTorch's F.gelu(approximate="tanh")
        a = 0.5 * g * (1.0 + tanh_and_slope(_gelu_tanh_inner(g))[0])
    return a


@triton.jit
def _activation_derivative(g, ACTIVATION: tl.constexpr):
    """act'(g), in the order of PyTorch's backward of each activation."""
    if ACTIVATION == SILU:
        s = tl.sigmoid(g)
        da = s * (1.0 + g * (1.0 - s))
    else:
        t, tanh_slope = tanh_and_slope(_gelu_tanh_inner(g))  # the slope 1 - t^2 without its cancellation
        inner_derivative = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        da = 0.5 * (1.0 + t) + 0.5 * g * tanh_slope * inner_derivative
    return da


@triton.jit
def _forward_kernel(
    G, U, Y,  # gate, up, output: (rows, N)
    g_stride, u_stride, y_stride,  # row strides in elements
    n_cols,
    ACTIVATION: tl.constexpr,  # SILU or GELU_TANH
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    y = _activation(g, ACTIVATION) * u
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    DY, G, U, DG, DU,  # output gradient, gate, up, their gradients: (rows, N)
    dy_stride, g_stride, u_stride, dg_stride, du_stride,  # row strides in elements
    n_cols,
    ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    dgate = dy * u * _activation_derivative(g, ACTIVATION)
    tl.store(DU + row * du_stride + cols, (dy * _activation(g, ACTIVATION)).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * dg_stride + cols, dgate.to(DG.dtype.element_ty), mask=mask)


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    num_warps = 1 if block <= 256 else 4 if block <= 1024 else 8
    return block, num_warps


def _column_slices(n_cols: int, block: int) -> list[slice | None]:
    """The column ranges of one launch each: None (all of them, the usual case) when the row's
    column blocks fit grid axis 1, else slices of MAX_GRID_Y * BLOCK columns (whose starts keep
    the rows' alignment: multiples of BLOCK)."""
    step = MAX_GRID_Y * block
    if n_cols <= step:
        return [None]
    return [slice(start, min(start + step, n_cols)) for start in range(0, n_cols, step)]


def _compute(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def forward(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor, activation: int) -> None:
    """y = act(gate) * up, on 2-D (rows, N) views; activation is SILU or GELU_TANH."""
    n_rows, n_cols = gate.shape
    block, num_warps = _block_and_warps(n_cols)
    with on_device(gate.device):  # Triton launches on the current GPU, which need not be gate's
        for cols in _column_slices(n_cols, block):
            g, u, out = (t if cols is None else t[:, cols] for t in (gate, up, y))
            _forward_kernel[(n_rows, triton.cdiv(g.size(1), block))](
                g, u, out,
                g.stride(0), u.stride(0), out.stride(0),
                g.size(1),
                ACTIVATION=activation, COMPUTE=_compute(gate), BLOCK=block, num_warps=num_warps,
            )


def backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor, activation: int
) -> None:
    """dgate and dup from the output gradient dy, on 2-D (rows, N) views."""
    n_rows, n_cols = gate.shape
    block, num_warps = _block_and_warps(n_cols)
    with on_device(gate.device):  # Triton launches on the current GPU, which need not be gate's
        for cols in _column_slices(n_cols, block):
            d, g, u, dg, du = (t if cols is None else t[:, cols] for t in (dy, gate, up, dgate, dup))
            _backward_kernel[(n_rows, triton.cdiv(g.size(1), block))](
                d, g, u, dg, du,
                d.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
                g.size(1),
                ACTIVATION=activation, COMPUTE=_compute(gate), BLOCK=block, num_warps=num_warps,
            )
