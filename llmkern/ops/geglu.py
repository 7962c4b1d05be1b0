"""GeGLU gating, the MLP non-linearity of Gemma's blocks:  y = gelu_tanh(gate) * up, with gelu's tanh
approximation computed as PyTorch's F.gelu(gate, approximate="tanh") computes it (and its derivative).

SwiGLU's twin: the checks, custom ops (llmkern::geglu, llmkern::geglu_backward) and dispatch are in
llmkern/ops/gated_activation.py, the kernels shared with SwiGLU's (an activation parameter). The cuda
kernels take float32, float16 and bfloat16: "auto" passes over them for float64, and backend="cuda"
with float64 is a TypeError.
"""

from __future__ import annotations

import torch

from . import gated_activation, reference


def geglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up, computed in fp32 (float64 for float64 inputs), returned in gate's dtype.

    Args:
        gate, up: one shape and dtype (float32, float16, bfloat16 or float64; not float64 for
            the cuda backend), contiguous in the last dimension (the two halves of a fused
            gate/up projection qualify).
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
    """
    return gated_activation.apply("geglu", _geglu_op, reference.geglu, gate, up, backend)


_geglu_op = gated_activation.custom_ops("geglu")
