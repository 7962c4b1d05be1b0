"""Gated activations, the MLP non-linearities y = act(gate) * up of SwiGLU (llmkern/ops/swiglu.py) and
GeGLU (geglu.py): their shared checks, custom ops and dispatch.

The cuda and triton backends of op <name> run through the custom ops llmkern::<name> and
llmkern::<name>_backward (fake kernels and autograd, so torch.compile(fullgraph=True) traces
them); the backward kernels recompute act(gate) from gate, so only the inputs are saved. The torch
backend is the plain reference, differentiated by PyTorch itself.

The cuda kernels take float32, float16 and bfloat16: "auto" passes over them for float64,
and backend="cuda" with float64 is a TypeError.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import _checks
from ._custom_op import CustomOp

_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def apply(name: str, op: CustomOp, reference_fn, gate: torch.Tensor, up: torch.Tensor, backend: str | None):
    """Op `name` on gate and up: their checks, then `reference_fn(gate, up)` for the torch backend
    or the custom op `op` (of custom_ops(name)) for the kernels'."""
    _checks.check_float("gate", gate, _DTYPES)
    _checks.check_float("up", up, _DTYPES)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must have one dtype; got {gate.dtype} and {up.dtype}")
    _checks.check_last_dim_contiguous("gate", gate)
    _checks.check_last_dim_contiguous("up", up)
    device = _checks.check_same_device(gate=gate, up=up)
    chosen = _backend.resolve(name, backend, device, fits=lambda b: fits_backend(b, gate))
    if not fits_backend(chosen, gate):
        raise TypeError(
            f"gate and up must have dtype float32, float16 or bfloat16 for backend 'cuda'; got {gate.dtype}"
        )
    if chosen == "torch":
        return reference_fn(gate, up)
    return op(gate, up, chosen)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, N): a view when the leading dims allow it (the halves of a fused projection
    do), else a copy; a copy too when the last dim is strided (an incoming gradient may be)."""
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.size(-1)) if t.dim() > 0 else t.reshape(1, 1)


def fits_backend(backend: str, gate: torch.Tensor) -> bool:
    """Whether `backend`'s kernels take gate's dtype: the cuda ones have no float64."""
    return backend != "cuda" or gate.dtype in _checks.FLOAT_DTYPES


def custom_ops(name: str) -> CustomOp:
    """The differentiable custom op llmkern::<name>(gate, up, backend) and its gradient op
    llmkern::<name>_backward, running the kernels of llmkern.<backend>.<name>."""

    def forward(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        y = gate.new_empty(gate.shape)
        if y.numel() > 0:
            g2 = _rows(gate)
            _backend.kernels(name, backend).forward(g2, _rows(up), y.view(g2.shape))
        return y

    def backward_impl(
        dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """dgate and dup, each of gate's shape and dtype."""
        dgate = gate.new_empty(gate.shape)
        dup = gate.new_empty(gate.shape)
        if gate.numel() > 0:
            g2 = _rows(gate)
            _backend.kernels(name, backend).backward(
                _rows(dy), g2, _rows(up), dgate.view(g2.shape), dup.view(g2.shape)
            )
        return dgate, dup

    backward_op = CustomOp(f"llmkern::{name}_backward", backward_impl, _backward_fake)

    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = backward_op(dy, gate, up, ctx.backend)
        return dgate, dup, None

    return CustomOp(f"llmkern::{name}", forward, _forward_fake, _setup_context, backward)


def _forward_fake(gate, up, backend):
    return gate.new_empty(gate.shape)


def _backward_fake(dy, gate, up, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(gate, up)
