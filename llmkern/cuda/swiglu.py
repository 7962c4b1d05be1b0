"""SwiGLU's CUDA kernels, y = silu(gate) * up: csrc/cuda/gated_activation.cu's swiglu_forward and
swiglu_backward, launched by llmkern/cuda/gated_activation.py."""

from __future__ import annotations

import torch

from . import gated_activation as _gated


def forward(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> None:
    """y = silu(gate) * up."""
    _gated.forward("swiglu", gate, up, y)


def backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """dgate and dup from the output gradient dy (silu(gate) recomputed)."""
    _gated.backward("swiglu", dy, gate, up, dgate, dup)
