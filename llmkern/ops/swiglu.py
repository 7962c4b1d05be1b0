"""SwiGLU gating, the MLP non-linearity of Llama-style blocks:  y = silu(gate) * up.

The checks, custom ops (llmkern::swiglu, llmkern::swiglu_backward) and dispatch are GeGLU's too:
llmkern/ops/gated_activation.py. The cuda kernels take float32, float16 and bfloat16: "auto"
passes over them for float64, and backend="cuda" with float64 is a TypeError.
"""

from __future__ import annotations

import torch

from . import gated_activation, reference


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 (float64 for float64 inputs), returned in gate's dtype.

    Args:
        gate, up: one shape and dtype (float32, float16, bfloat16 or float64; not float64 for
            the cuda backend), contiguous in the last dimension (the two halves of a fused
            gate/up projection qualify).
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
    """
    return gated_activation.apply("swiglu", _swiglu_op, reference.swiglu, gate, up, backend)


_swiglu_op = gated_activation.custom_ops("swiglu")
