"""Argument checks shared by the ops: each failure names the argument, what was expected
and what came, as TypeError or ValueError (never assert: it vanishes under python -O)."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP32 = torch.finfo(torch.float32)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: object, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )
    return first.device


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1); got strides {tuple(t.stride())}"
        )


def check_positive_float(name: str, value: object) -> float:
    # numbers.Real, not (int, float): a NumPy scalar (np.float32(1e-6), a config read with NumPy) is a float too
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    # The kernels take it as an fp32 scalar: inf, or a value that rounds to inf or 0 there, would give
    # zeros or NaN (eps=inf zeroes a norm's output) rather than an error.
    if not _FP32.tiny <= value <= _FP32.max:
        raise ValueError(f"{name} must be finite in float32, in [{_FP32.tiny:.4g}, {_FP32.max:.4g}]; got {value}")
    return float(value)
