"""LayerNorm with an optional bias and fused residual add.

    y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias,   h = x + residual (or x)

The form of llmkern.ops.rms_norm, centered: with `residual` it returns (y, h) in one pass over
memory, a 16-bit x may join an fp32 residual, and out_dtype may ask for a 16-bit y, so that under
autocast a GPT-2 block's norms run with no add or cast kernel around them. The kernels are the
centered form of RMSNorm's (llmkern/triton/_norm.py, csrc/cuda/norm.cuh); the torch backend is
F.layer_norm in fp32, differentiated by PyTorch itself.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import _checks, _norm, reference
from ._custom_op import CustomOp


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
):
    """LayerNorm over the last dimension of x.

    Args:
        x: (..., N) float32, float16 or bfloat16, contiguous in its last dimension; N in [1, 65536]
            (MAX_HIDDEN) on every backend, so that a model runs on each.
        weight: (N,) of h's dtype or float32 (fp32 parameters under autocast).
        bias: optional, (N,) of weight's dtype.
        eps: added to the variance before the square root.
        residual: optional, x's shape, and x's dtype or float32 beside a 16-bit x; when given,
            h = x + residual, in residual's dtype, is normed and returned too.
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
        out_dtype: y's dtype: None for h's; float16 or bfloat16 when h is float32.

    Returns:
        y of x's shape, or (y, h) when residual is given.
    """
    _norm.check_args(x, weight, eps, residual, out_dtype, bias)
    device = _checks.check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    chosen = _backend.resolve("layer_norm", backend, device)
    out_dtype = _norm.stream_dtype(x, residual) if out_dtype is None else out_dtype
    eps = float(eps)  # a NumPy scalar or a Fraction, say, as every backend takes it
    if chosen == "torch":
        return reference.layer_norm(x, weight, bias, eps, residual, out_dtype)
    y, h = _layer_norm_op(x, weight, bias, residual, eps, out_dtype, chosen)
    return y if residual is None else (y, h)


def _layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
    eps: float, out_dtype: torch.dtype, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    def launch(x2, residual2, y2, h2):
        _backend.kernels("layer_norm", backend).forward(x2, weight, bias, residual2, eps, y2, h2)

    return _norm.run_forward(x, residual, out_dtype, launch)


def _layer_norm_fake(x, weight, bias, residual, eps, out_dtype, backend):
    return _norm.outputs(x, residual, out_dtype)


def _layer_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    dh_extra: Optional[torch.Tensor],
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dh (the gradient of the normed input h, plus dh_extra) in h's dtype, dweight, and dbias (an
    empty tensor without a bias); dy may be 16-bit beside an fp32 h."""
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight) if has_bias else weight.new_empty(0)

    def launch(dy2, h2, extra2, dh2):
        _backend.kernels("layer_norm", backend).backward(
            dy2, h2, weight, extra2, eps, dh2, dweight, dbias if has_bias else None
        )

    return _norm.run_backward(dy, h, dh_extra, [dweight, dbias], launch), dweight, dbias


def _layer_norm_backward_fake(dy, h, weight, has_bias, dh_extra, eps, backend):
    return _norm.contiguous_like(h), torch.empty_like(weight), (torch.empty_like(weight) if has_bias
                                                                else weight.new_empty(0))


_layer_norm_backward_op = CustomOp("llmkern::layer_norm_backward", _layer_norm_backward, _layer_norm_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, _, backend = inputs
    _, h = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
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
        return (None if dh is None else dh.to(ctx.x_dtype)), None, None, dh, None, None, None
    dh_extra = dh_out.contiguous() if ctx.has_residual and dh_out is not None else None
    dh, dweight, dbias = _layer_norm_backward_op(
        dy.contiguous(), h, weight, ctx.has_bias, dh_extra, ctx.eps, ctx.backend
    )
    dx = dh.to(ctx.x_dtype)  # a 16-bit branch beside an fp32 stream gets its gradient in 16 bits
    return dx, dweight, (dbias if ctx.has_bias else None), (dh if ctx.has_residual else None), None, None, None


_layer_norm_op = CustomOp("llmkern::layer_norm", _layer_norm, _layer_norm_fake, _setup_context, _backward)
