"""RMSNorm with an optional fused residual add.

    y = h / sqrt(mean(h**2, -1) + eps) * weight,   h = x + residual (or x)

With `residual` given it returns (y, h): the normed input of a pre-norm transformer block and
the updated residual stream, in one pass over memory.

The cuda and triton backends run through the custom ops llmkern::rms_norm and
llmkern::rms_norm_backward (with fake kernels and autograd, so torch.compile(fullgraph=True)
traces them); the torch backend is the plain reference, differentiated by PyTorch itself.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _backend
from . import _checks, reference

MAX_HIDDEN = 65536


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
):
    """RMSNorm over the last dimension of x.

    Args:
        x: (..., N) float32, float16 or bfloat16, contiguous in its last dimension.
        weight: (N,) of x's dtype or float32 (fp32 parameters under autocast).
        eps: added to the mean square before the square root.
        residual: optional, x's shape and dtype; when given, h = x + residual is normed and
            returned too.
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().

    Returns:
        y of x's shape and dtype, or (y, h) when residual is given.
    """
    _check_args(x, weight, eps, residual)
    device = _checks.check_same_device(x=x, weight=weight, residual=residual)
    chosen = _backend.resolve("rms_norm", backend, device)
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps, residual)
    y, h = torch.ops.llmkern.rms_norm(x, weight, residual, float(eps), chosen)
    return y if residual is None else (y, h)


def _check_args(x, weight, eps, residual) -> None:
    _checks.check_float("x", x)
    _checks.check_float("weight", weight)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden size); got a 0-d tensor")
    n = x.size(-1)
    if not 1 <= n <= MAX_HIDDEN:
        raise ValueError(f"x's last dimension (the hidden size) must be in [1, {MAX_HIDDEN}], got {n}")
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},) to match x's last dimension; got {tuple(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must have x's dtype ({x.dtype}) or float32; got {weight.dtype}")
    _checks.check_positive_float("eps", eps)
    _checks.check_last_dim_contiguous("x", x)
    if weight.numel() > 1 and weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous; got stride {weight.stride(0)}")
    if residual is not None:
        _checks.check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype ({x.dtype}); got {residual.dtype}")
        _checks.check_last_dim_contiguous("residual", residual)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, N): a view when the leading dims allow it, else a copy."""
    return t.reshape(-1, t.size(-1))


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialized contiguous tensor of t's shape and dtype. Not empty_like(t): for a
    dense but permuted t (a transposed batch) it would copy t's strides, and the kernels'
    2-D (rows, N) view of it would not exist."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _kernels(backend: str):
    """llmkern.cuda.rms_norm or llmkern.triton.rms_norm: their forward/backward take 2-D views."""
    if backend not in ("cuda", "triton"):
        raise ValueError(f"llmkern::rms_norm runs the cuda or triton backend, got {backend!r}")
    return importlib.import_module(f"llmkern.{backend}.rms_norm")


@torch.library.custom_op("llmkern::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    res2 = None if residual is None else _rows(residual)
    y = _contiguous_like(x)
    h = _contiguous_like(x) if residual is not None else x.new_empty(0)
    if x.numel() > 0:
        _kernels(backend).forward(
            x2, weight, res2, eps, y.view(x2.shape), None if residual is None else h.view(x2.shape)
        )
    return y, h


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, backend):
    h = _contiguous_like(x) if residual is not None else x.new_empty(0)
    return _contiguous_like(x), h


@torch.library.custom_op("llmkern::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    dh_extra: Optional[torch.Tensor],
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dh (the gradient of the normed input h, plus dh_extra) and dweight."""
    dh = _contiguous_like(h)
    dweight = torch.empty_like(weight)
    if h.numel() == 0:
        dweight.zero_()
        return dh, dweight
    h2 = _rows(h)
    dy2 = _rows(dy)
    extra2 = None if dh_extra is None else _rows(dh_extra)
    _kernels(backend).backward(dy2, h2, weight, extra2, eps, dh.view(h2.shape), dweight)
    return dh, dweight


@_rms_norm_backward_op.register_fake
def _(dy, h, weight, dh_extra, eps, backend):
    return _contiguous_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, backend = inputs
    _, h = output
    ctx.has_residual = residual is not None
    ctx.eps = eps
    ctx.backend = backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight)


def _backward(ctx, dy, dh_out):
    h, weight = ctx.saved_tensors
    dh_extra = dh_out.contiguous() if ctx.has_residual and dh_out is not None else None
    dh, dweight = torch.ops.llmkern.rms_norm_backward(
        dy.contiguous(), h, weight, dh_extra, ctx.eps, ctx.backend
    )
    return dh, dweight, (dh if ctx.has_residual else None), None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
