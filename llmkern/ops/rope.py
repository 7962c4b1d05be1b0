"""Rotary position embedding (RoPE), rotate-half convention, fp32 math.

    x = [x1, x2] (each D/2 wide)  ->  [x1 * cos - x2 * sin,  x2 * cos + x1 * sin]

This is the convention of GPT-NeoX and the Hugging Face Llama code: the pair rotated by the
angle of frequency i is (x[i], x[i + D/2]), not two neighbours. cos and sin are D/2 wide
(one angle per pair); llmkern.nn.rotary.RotaryCache builds them.

Only the torch backend exists for now; the op layer is here so that kernels can join it
with the signature unchanged.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import _checks, reference


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
            generation, where positions differ per row); float32 or float64.
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().

    Returns:
        A new tensor of x's shape and dtype.
    """
    _check_args(x, cos, sin)
    device = _checks.check_same_device(x=x, cos=cos, sin=sin)
    chosen = _backend.resolve("rope", backend, device)
    if chosen != "torch":  # resolve() raises for backends without kernels, so this is unreachable today
        raise NotImplementedError(f"rope has no {chosen} kernels yet")
    return reference.rope(x, cos, sin)


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
