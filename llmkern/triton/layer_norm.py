"""LayerNorm in Triton, forward and backward, with an optional fused residual add and bias: the
row-norm kernels of llmkern/triton/_norm.py, centered (same contract as csrc/cuda/layer_norm.cu)."""

from __future__ import annotations

from . import _norm


def forward(x, weight, bias, residual, eps, y, h) -> None:
    """y (and h when residual is given) from 2-D (rows, N) views; bias may be None."""
    _norm.forward(x, weight, bias, residual, eps, y, h, centered=True)


def backward(dy, h, weight, dh_extra, eps, dh, dweight, dbias) -> None:
    """dh (plus dh_extra), dweight and dbias (unless None) from 2-D (rows, N) views."""
    _norm.backward(dy, h, weight, dh_extra, eps, dh, dweight, dbias, centered=True)
