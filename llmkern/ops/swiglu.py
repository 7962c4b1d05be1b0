"""SwiGLU gating, the MLP non-linearity of Llama-style blocks:  y = silu(gate) * up.

Only the torch backend exists for now; the op layer is here so that kernels can join it
with the signature unchanged.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import _checks, reference

_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 (float64 for float64 inputs), returned in gate's dtype.

    Args:
        gate, up: one shape and dtype (float32, float16, bfloat16 or float64), contiguous in
            the last dimension (the two halves of a fused gate/up projection qualify).
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
    """
    _checks.check_float("gate", gate, _DTYPES)
    _checks.check_float("up", up, _DTYPES)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must have one dtype; got {gate.dtype} and {up.dtype}")
    _checks.check_last_dim_contiguous("gate", gate)
    _checks.check_last_dim_contiguous("up", up)
    device = _checks.check_same_device(gate=gate, up=up)
    chosen = _backend.resolve("swiglu", backend, device)
    if chosen != "torch":  # resolve() raises for backends without kernels, so this is unreachable today
        raise NotImplementedError(f"swiglu has no {chosen} kernels yet")
    return reference.swiglu(gate, up)
