"""RMSNorm with an optional fused residual add.

    y = h / sqrt(mean(h**2, -1) + eps) * weight,   h = x + residual (or x)

With `residual` given it returns (y, h): the normed input of a pre-norm transformer block and
the updated residual stream, in one pass over memory.

Under autocast the stream is fp32 and the matmuls on either side 16-bit: x (a block's branch) may
then be bf16 or fp16 beside an fp32 residual, and out_dtype may ask for y in 16 bits, so that the
kernels read and write what the neighbours hold, with no cast kernel before or after the norm.

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
_HALF_DTYPES = (torch.float16, torch.bfloat16)


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
        x: (..., N) float32, float16 or bfloat16, contiguous in its last dimension.
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
    _check_args(x, weight, eps, residual, out_dtype)
    device = _checks.check_same_device(x=x, weight=weight, residual=residual)
    chosen = _backend.resolve("rms_norm", backend, device)
    stream_dtype = x.dtype if residual is None else residual.dtype
    out_dtype = stream_dtype if out_dtype is None else out_dtype
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps, residual, out_dtype)
    y, h = torch.ops.llmkern.rms_norm(x, weight, residual, float(eps), out_dtype, chosen)
    return y if residual is None else (y, h)


def _check_args(x, weight, eps, residual, out_dtype) -> None:
    _checks.check_float("x", x)
    _checks.check_float("weight", weight)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden size); got a 0-d tensor")
    n = x.size(-1)
    if not 1 <= n <= MAX_HIDDEN:
        raise ValueError(f"x's last dimension (the hidden size) must be in [1, {MAX_HIDDEN}], got {n}")
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},) to match x's last dimension; got {tuple(weight.shape)}")
    stream_dtype = x.dtype if residual is None else residual.dtype
    if weight.dtype not in (stream_dtype, torch.float32):
        which = "x's" if residual is None else "residual's"
        raise TypeError(f"weight must have {which} dtype ({stream_dtype}) or float32; got {weight.dtype}")
    _checks.check_positive_float("eps", eps)
    _checks.check_last_dim_contiguous("x", x)
    if weight.numel() > 1 and weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous; got stride {weight.stride(0)}")
    if residual is not None:
        _checks.check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype in _HALF_DTYPES):
            raise TypeError(f"residual must have x's dtype ({x.dtype}), or float32 with a 16-bit x; "
                            f"got {residual.dtype}")
        _checks.check_last_dim_contiguous("residual", residual)
    if out_dtype is not None and out_dtype != stream_dtype and not (
        stream_dtype == torch.float32 and out_dtype in _HALF_DTYPES
    ):
        raise TypeError(f"out_dtype must be None, {stream_dtype} (h's dtype), or float16 or bfloat16 when h is "
                        f"float32; got {out_dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, N): a view when the leading dims allow it, else a copy."""
    return t.reshape(-1, t.size(-1))


def _contiguous_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized contiguous tensor of t's shape and dtype (or `dtype`). Not empty_like(t):
    for a dense but permuted t (a transposed batch) it would copy t's strides, and the kernels'
    2-D (rows, N) view of it would not exist."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def _kernels(backend: str):
    """llmkern.cuda.rms_norm or llmkern.triton.rms_norm: their forward/backward take 2-D views."""
    if backend not in ("cuda", "triton"):
        raise ValueError(f"llmkern::rms_norm runs the cuda or triton backend, got {backend!r}")
    return importlib.import_module(f"llmkern.{backend}.rms_norm")


@torch.library.custom_op("llmkern::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    res2 = None if residual is None else _rows(residual)
    y = _contiguous_like(x, out_dtype)
    h = _contiguous_like(residual) if residual is not None else x.new_empty(0)
    if x.numel() > 0:
        _kernels(backend).forward(
            x2, weight, res2, eps, y.view(x2.shape), None if residual is None else h.view(x2.shape)
        )
    return y, h


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, out_dtype, backend):
    h = _contiguous_like(residual) if residual is not None else x.new_empty(0)
    return _contiguous_like(x, out_dtype), h


@torch.library.custom_op("llmkern::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    dh_extra: Optional[torch.Tensor],
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dh (the gradient of the normed input h, plus dh_extra), in h's dtype, and dweight; dy may be
    16-bit beside an fp32 h."""
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
    x, weight, residual, eps, _, backend = inputs
    _, h = output
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.eps = eps
    ctx.backend = backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight)


def _backward(ctx, dy, dh_out):
    h, weight = ctx.saved_tensors
    dh_extra = dh_out.contiguous() if ctx.has_residual and dh_out is not None else None
    dh, dweight = torch.ops.llmkern.rms_norm_backward(
        dy.contiguous(), h, weight, dh_extra, ctx.eps, ctx.backend
    )
    dx = dh.to(ctx.x_dtype)  # a 16-bit branch beside an fp32 stream gets its gradient in 16 bits
    return dx, dweight, (dh if ctx.has_residual else None), None, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
