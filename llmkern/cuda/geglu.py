"""GeGLU's CUDA kernels, y = gelu_tanh(gate) * up: csrc/cuda/gated_activation.cu's geglu_forward and
geglu_backward, launched by llmkern/cuda/gated_activation.py."""

from __future__ import annotations

import torch

from . import gated_activation as _gated


def forward(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> None:
    """y = gelu_tanh(gate) * up."""
    _gated.forward("geglu", gate, up, y)


def backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """dgate and dup from the output gradient dy (gelu_tanh(gate) recomputed)."""
    _gated.backward("geglu", dy, gate, up, dgate, dup)
