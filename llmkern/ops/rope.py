"""Rotary position embedding (RoPE), rotate-half convention, fp32 math.

    x = [x1, x2] (each D/2 wide)  ->  [x1 * cos - x2 * sin,  x2 * cos + x1 * sin]

This is the convention of GPT-NeoX and the Hugging Face Llama code: the pair rotated by the
angle of frequency i is (x[i], x[i + D/2]), not two neighbours. cos and sin are D/2 wide
(one angle per pair); llmkern.nn.rotary.RotaryCache builds them. Positions (a KV-cache offset,
left-padded rows) are chosen by the caller when it slices or gathers the tables.

The cuda and triton backends run through the custom op llmkern::rope (fake kernel and
autograd, so torch.compile(fullgraph=True) traces it). Its gradient is the rotation by -theta,
which is the same op with `inverse=True`; no gradient flows to cos and sin there (they are
tables). The torch backend is the plain reference, differentiated by PyTorch itself.

The cuda kernel takes float32, float16 or bfloat16 x and float32 tables only: "auto" passes
over it for float64 x or tables, and backend="cuda" with them is a TypeError.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import _checks, reference
from ._custom_op import CustomOp


def rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate x (B, H, S, D) by the angles whose cos and sin are given.

    Args:
        x: (B, H, S, D) float32, float16 or bfloat16 (float64 allowed, for reference checks);
            D even. Any strides (q/k views of a fused QKV projection are fine).
        cos, sin: (S, D/2) shared by the batch, or (B, S, D/2) per batch row (left-padded
            generation, where positions differ per row); float32 or float64 (float32 only
            for the cuda backend).
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
            Only "torch" differentiates cos and sin: "auto" takes it for tables that require grad.

    Returns:
        A new tensor of x's shape and dtype (contiguous).
    """
    _check_args(x, cos, sin)
    device = _checks.check_same_device(x=x, cos=cos, sin=sin)
    chosen = _backend.resolve("rope", backend, device, fits=lambda b: _fits_backend(b, x, cos, sin))
    _check_backend_limits(chosen, x, cos, sin)
    if chosen == "torch":
        return reference.rope(x, cos, sin)
    return _rope_op(x, cos, sin, False, chosen)


_X_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)
_ANGLE_DTYPES = (torch.float32, torch.float64)


def _check_args(x, cos, sin) -> None:
    _checks.check_float("x", x, _X_DTYPES)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, S, D); got shape {tuple(x.shape)}")
    b, _, s, d = x.shape
    if d % 2 != 0:
        raise ValueError(f"x's head dim must be even (RoPE rotates pairs); got {d}")
    shared, per_row = (s, d // 2), (b, s, d // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_float(name, t, _ANGLE_DTYPES)
        if tuple(t.shape) not in (shared, per_row):
            raise ValueError(
                f"{name} must have shape (S, D/2) = {shared} or (B, S, D/2) = {per_row}; got {tuple(t.shape)}"
            )
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape; got {tuple(cos.shape)} and {tuple(sin.shape)}")


# The dtypes the cuda kernel takes (csrc/cuda/rope.cu: fp32 math, fp32 tables); the other
# backends take every dtype _check_args allows.
_CUDA_X_DTYPES = _checks.FLOAT_DTYPES
_CUDA_ANGLE_DTYPES = (torch.float32,)


def _tables_need_grad(cos, sin) -> bool:
    return torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)


def _fits_backend(backend: str, x, cos, sin) -> bool:
    """Whether `backend`'s kernels can run this call ("auto" skips a backend that cannot): no kernel
    differentiates cos and sin (learned angles go to torch), and the cuda one takes only some dtypes."""
    if backend == "torch":
        return True
    if _tables_need_grad(cos, sin):
        return False
    if backend != "cuda":
        return True
    return x.dtype in _CUDA_X_DTYPES and cos.dtype in _CUDA_ANGLE_DTYPES and sin.dtype in _CUDA_ANGLE_DTYPES


def _check_backend_limits(backend: str, x, cos, sin) -> None:
    """A clear error when an explicitly chosen backend cannot run this call."""
    if _fits_backend(backend, x, cos, sin):
        return
    if _tables_need_grad(cos, sin):
        raise ValueError(
            f"rope's {backend} kernels do not differentiate cos and sin, which require grad here; "
            "pass detached tables, or backend='torch' (or 'auto')"
        )
    if x.dtype not in _CUDA_X_DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16 for backend 'cuda'; got {x.dtype}")
    raise TypeError(
        f"cos and sin must be float32 for backend 'cuda'; got {cos.dtype} and {sin.dtype} "
        "(use backend='triton' or 'torch' for float64 tables)"
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.size(-1) <= 1 or t.stride(-1) == 1 else t.contiguous()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, backend: str) -> torch.Tensor:
    """x (B, H, S, D) rotated by theta, or by -theta when inverse (the gradient)."""
    y = x.new_empty(x.shape)
    if y.numel() > 0:
        x, cos, sin = (_last_dim_contiguous(t) for t in (x, cos, sin))  # no-ops for the model's views
        _backend.kernels("rope", backend).forward(x, cos, sin, y, inverse)
    return y


def _rope_fake(x, cos, sin, inverse, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin, inverse, backend = inputs
    ctx.inverse = inverse
    ctx.backend = backend
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    # A rotation's gradient is the opposite rotation: the same op, which is itself differentiable.
    dx = _rope_op(dy, cos, sin, not ctx.inverse, ctx.backend)
    return dx, None, None, None, None


_rope_op = CustomOp("llmkern::rope", _rope, _rope_fake, _setup_context, _backward)
