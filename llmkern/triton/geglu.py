"""GeGLU's Triton kernels, y = gelu_tanh(gate) * up: the gated-activation kernels of
llmkern/triton/gated_activation.py with ACTIVATION = GELU_TANH (gelu with
the tanh approximation, as PyTorch computes it)."""

from __future__ import annotations

import torch

from . import gated_activation as _gated


def forward(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> None:
    """y = gelu_tanh(gate) * up, on 2-D (rows, N) views."""
    _gated.forward(gate, up, y, _gated.GELU_TANH)


def backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """dgate and dup from the output gradient dy, on 2-D (rows, N) views."""
    _gated.backward(dy, gate, up, dgate, dup, _gated.GELU_TANH)
