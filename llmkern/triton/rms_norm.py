"""RMSNorm in Triton, forward and backward, with an optional fused residual add: the row-norm
kernels of llmkern/triton/_norm.py without centering or bias (same contract as csrc/cuda/rms_norm.cu)."""

from __future__ import annotations

from . import _norm


def forward(x, weight, residual, eps, y, h) -> None:
    """y (and h when residual is given) from 2-D (rows, N) views."""
    _norm.forward(x, weight, None, residual, eps, y, h, centered=False)


def backward(dy, h, weight, dh_extra, eps, dh, dweight) -> None:
    """dh (plus dh_extra) and dweight from 2-D (rows, N) views."""
    _norm.backward(dy, h, weight, dh_extra, eps, dh, dweight, None, centered=False)
