"""SwiGLU gating, the MLP non-linearity of Llama-style blocks:  y = silu(gate) * up.

The cuda and triton backends run through the custom ops llmkern::swiglu and
llmkern::swiglu_backward (fake kernels and autograd, so torch.compile(fullgraph=True) traces
them); the backward kernels recompute silu from gate, so only the inputs are saved. The torch
backend is the plain reference, differentiated by PyTorch itself.

The cuda kernels take float32, float16 and bfloat16: "auto" passes over them for float64,
and backend="cuda" with float64 is a TypeError.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import _checks, reference
from ._custom_op import CustomOp

_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 (float64 for float64 inputs), returned in gate's dtype.

    Args:
        gate, up: one shape and dtype (float32, float16, bfloat16 or float64; not float64 for
            the cuda backend), contiguous in the last dimension (the two halves of a fused
            gate/up projection qualify).
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
    chosen = _backend.resolve("swiglu", backend, device, fits=lambda b: _fits_backend(b, gate))
    if not _fits_backend(chosen, gate):
        raise TypeError(
            f"gate and up must have dtype float32, float16 or bfloat16 for backend 'cuda'; got {gate.dtype}"
        )
    if chosen == "torch":
        return reference.swiglu(gate, up)
    return _swiglu_op(gate, up, chosen)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, N): a view when the leading dims allow it (the halves of a fused projection
    do), else a copy; a copy too when the last dim is strided (an incoming gradient may be)."""
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.size(-1)) if t.dim() > 0 else t.reshape(1, 1)


def _fits_backend(backend: str, gate: torch.Tensor) -> bool:
    """Whether `backend`'s kernels take gate's dtype: the cuda ones have no float64."""
    return backend != "cuda" or gate.dtype in _checks.FLOAT_DTYPES


def _swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    y = gate.new_empty(gate.shape)
    if y.numel() > 0:
        g2 = _rows(gate)
        _backend.kernels("swiglu", backend).forward(g2, _rows(up), y.view(g2.shape))
    return y


def _swiglu_fake(gate, up, backend):
    return gate.new_empty(gate.shape)


def _swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """dgate and dup, each of gate's shape and dtype."""
    dgate = gate.new_empty(gate.shape)
    dup = gate.new_empty(gate.shape)
    if gate.numel() > 0:
        g2 = _rows(gate)
        _backend.kernels("swiglu", backend).backward(_rows(dy), g2, _rows(up), dgate.view(g2.shape), dup.view(g2.shape))
    return dgate, dup


def _swiglu_backward_fake(dy, gate, up, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


_swiglu_backward_op = CustomOp("llmkern::swiglu_backward", _swiglu_backward, _swiglu_backward_fake)


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(gate, up)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_backward_op(dy, gate, up, ctx.backend)
    return dgate, dup, None


_swiglu_op = CustomOp("llmkern::swiglu", _swiglu, _swiglu_fake, _setup_context, _backward)
