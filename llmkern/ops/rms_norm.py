"""RMSNorm with an optional fused residual add.

    y = h / sqrt(mean(h**2, -1) + eps) * weight,   h = x + residual (or x)

With `residual` given it returns (y, h): the normed input of a pre-norm transformer block and
the updated residual stream, in one pass over memory.

Under autocast the stream is fp32 and the matmuls on either side 16-bit: x (a block's branch) may
then be bf16 or fp16 beside an fp32 residual, and out_dtype may ask for y in 16 bits, so that the
kernels read and write what the neighbours hold, with no cast kernel before or after the norm.

The cuda and triton backends run through the custom ops llmkern::rms_norm and
llmkern::rms_norm_backward (with fake kernels and autograd, so torch.compile(fullgraph=True)
traces them; eager calls skip torch.library's Python layers, see _autograd_op.py); the torch
backend is the plain reference, differentiated by PyTorch itself.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import _checks, _norm, reference
from ._custom_op import CustomOp
from ._norm import MAX_HIDDEN  # noqa: F401  (the limit's public name here)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
):
    """RMSNorm over the last dimension of x.

    Args:
        x: (..., N) float32, float16 or bfloat16, contiguous in its last dimension; N in [1, 65536]
            (MAX_HIDDEN) on every backend, so that a model runs on each.
        weight: (N,) of h's dtype or float32 (fp32 parameters under autocast).
        eps: added to the mean square before the square root.
        residual: optional, x's shape, and x's dtype or float32 beside a 16-bit x; when given,
            h = x + residual, in residual's dtype, is normed and returned too.
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
        out_dtype: y's dtype: None for h's (x's without a residual); float16 or bfloat16 when h
            is float32.

    Returns:
        y of x's shape, or (y, h) when residual is given.
    """
    _norm.check_args(x, weight, eps, residual, out_dtype)
    device = _checks.check_same_device(x=x, weight=weight, residual=residual)
    chosen = _backend.resolve("rms_norm", backend, device)
    out_dtype = _norm.stream_dtype(x, residual) if out_dtype is None else out_dtype
    eps = float(eps)  # a NumPy scalar or a Fraction, say, as every backend takes it
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps, residual, out_dtype)
    y, h = _rms_norm_op(x, weight, residual, eps, out_dtype, chosen)
    return y if residual is None else (y, h)


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    def launch(x2, residual2, y2, h2):
        _backend.kernels("rms_norm", backend).forward(x2, weight, residual2, eps, y2, h2)

    return _norm.run_forward(x, residual, out_dtype, launch)


def _rms_norm_fake(x, weight, residual, eps, out_dtype, backend):
    return _norm.outputs(x, residual, out_dtype)


def _rms_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    dh_extra: Optional[torch.Tensor],
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dh (the gradient of the normed input h, plus dh_extra), in h's dtype, and dweight; dy may be
    16-bit beside an fp32 h."""
    dweight = torch.empty_like(weight)

    def launch(dy2, h2, extra2, dh2):
        _backend.kernels("rms_norm", backend).backward(dy2, h2, weight, extra2, eps, dh2, dweight)

    return _norm.run_backward(dy, h, dh_extra, [dweight], launch), dweight


def _rms_norm_backward_fake(dy, h, weight, dh_extra, eps, backend):
    return _norm.contiguous_like(h), torch.empty_like(weight)


_rms_norm_backward_op = CustomOp("llmkern::rms_norm_backward", _rms_norm_backward, _rms_norm_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, _, backend = inputs
    _, h = output
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.eps = eps
    ctx.backend = backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight)
    # An output without a gradient (y, or h, unused) comes to the backward as None, not as zeros of x's size.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh_out):
    h, weight = ctx.saved_tensors
    if dy is None:  # y unused: only h = x + residual carries a gradient, straight through; weight gets none
        dh = dh_out if ctx.has_residual else None
        return (None if dh is None else dh.to(ctx.x_dtype)), None, dh, None, None, None
    dh_extra = dh_out.contiguous() if ctx.has_residual and dh_out is not None else None
    dh, dweight = _rms_norm_backward_op(
        dy.contiguous(), h, weight, dh_extra, ctx.eps, ctx.backend
    )
    dx = dh.to(ctx.x_dtype)  # a 16-bit branch beside an fp32 stream gets its gradient in 16 bits
    return dx, dweight, (dh if ctx.has_residual else None), None, None, None


_rms_norm_op = CustomOp("llmkern::rms_norm", _rms_norm, _rms_norm_fake, _setup_context, _backward)
