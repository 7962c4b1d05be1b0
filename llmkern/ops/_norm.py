"""What the row-norm ops (rms_norm, layer_norm) share: their argument checks and the 2-D views
and outputs their kernels take."""

from __future__ import annotations

import torch

from . import _checks

MAX_HIDDEN = 65536
HALF_DTYPES = (torch.float16, torch.bfloat16)


def stream_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """h's dtype: the residual stream's (residual's), or x's without one."""
    return x.dtype if residual is None else residual.dtype


def fits_beside(dtype: torch.dtype, stream: torch.dtype) -> bool:
    """Whether a tensor of `dtype` (x, y or dy) can sit beside a stream of dtype `stream`: the
    stream's own, or a 16-bit one beside an fp32 stream (autocast's mix)."""
    return dtype == stream or (stream == torch.float32 and dtype in HALF_DTYPES)


def check_args(x, weight, eps, residual, out_dtype, bias=None) -> None:
    """x (..., N) of a float dtype; weight (and bias) (N,) of h's dtype or fp32; residual x's shape,
    and x's dtype or fp32 beside a 16-bit x; out_dtype None, h's dtype, or 16-bit beside an fp32 h."""
    _checks.check_float("x", x)
    _checks.check_float("weight", weight)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden size); got a 0-d tensor")
    n = x.size(-1)
    if not 1 <= n <= MAX_HIDDEN:
        raise ValueError(f"x's last dimension (the hidden size) must be in [1, {MAX_HIDDEN}], got {n}")
    if residual is not None:
        _checks.check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
        if not fits_beside(x.dtype, residual.dtype):
            raise TypeError(f"residual must have x's dtype ({x.dtype}), or float32 with a 16-bit x; "
                            f"got {residual.dtype}")
        _checks.check_last_dim_contiguous("residual", residual)
    h_dtype = stream_dtype(x, residual)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _checks.check_float(name, t)
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x's last dimension; got {tuple(t.shape)}")
        if t.dtype not in (h_dtype, torch.float32):
            which = "x's" if residual is None else "residual's"
            raise TypeError(f"{name} must have {which} dtype ({h_dtype}) or float32; got {t.dtype}")
        if t.numel() > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous; got stride {t.stride(0)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have weight's dtype ({weight.dtype}); got {bias.dtype}")
    _checks.check_positive_float("eps", eps)
    _checks.check_last_dim_contiguous("x", x)
    if out_dtype is not None and not fits_beside(out_dtype, h_dtype):
        raise TypeError(f"out_dtype must be None, {h_dtype} (h's dtype), or float16 or bfloat16 when h is "
                        f"float32; got {out_dtype!r}")  # repr: the string "float16" must not read as the dtype


def module_inputs(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.dtype | None]:
    """(x, out_dtype) as a norm module passes them to its op: x in residual's dtype unless it is a 16-bit
    branch joining an fp32 stream (the op adds those itself); and, under autocast with an fp32 stream,
    y in autocast's 16-bit dtype, the next matmul's (None otherwise: h's dtype)."""
    if residual is not None and not fits_beside(x.dtype, residual.dtype):
        x = x.to(residual.dtype)
    h_dtype, device_type = stream_dtype(x, residual), x.device.type
    if h_dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        if autocast_dtype in HALF_DTYPES:
            return x, autocast_dtype
    return x, None


def rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, N): a view when the leading dims allow it, else a copy."""
    return t.reshape(-1, t.size(-1))


def contiguous_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized contiguous tensor of t's shape and dtype (or `dtype`). Not empty_like(t):
    for a dense but permuted t (a transposed batch) it would copy t's strides, and the kernels'
    2-D (rows, N) view of it would not exist."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def outputs(x: torch.Tensor, residual: torch.Tensor | None, out_dtype: torch.dtype):
    """The forward ops' (y, h): y x's shape in out_dtype; h residual's shape and dtype (empty without)."""
    h = contiguous_like(residual) if residual is not None else x.new_empty(0)
    return contiguous_like(x, out_dtype), h


def run_forward(x: torch.Tensor, residual: torch.Tensor | None, out_dtype: torch.dtype, launch):
    """A forward op's body: (y, h) allocated, and launch(x, residual, y, h) on their 2-D (rows, N)
    views (residual and h None without a residual) unless there are no rows."""
    y, h = outputs(x, residual, out_dtype)
    if x.numel() > 0:
        x2 = rows(x)
        with_residual = residual is not None
        launch(x2, rows(residual) if with_residual else None, y.view(x2.shape),
               h.view(x2.shape) if with_residual else None)
    return y, h


def run_backward(dy: torch.Tensor, h: torch.Tensor, dh_extra: torch.Tensor | None, param_grads, launch):
    """A backward op's body: dh allocated, and launch(dy, h, dh_extra, dh) on 2-D views, which also
    writes param_grads (the parameters' gradients); with no rows those are zeroed instead."""
    dh = contiguous_like(h)
    if h.numel() > 0:
        h2 = rows(h)
        launch(rows(dy), h2, None if dh_extra is None else rows(dh_extra), dh.view(h2.shape))
    else:
        for grad in param_grads:
            grad.zero_()
    return dh
