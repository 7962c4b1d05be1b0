"""What crosses from a torch tensor into llmkern._cuda: a pointer, a dtype code, a stream."""

from __future__ import annotations

import contextlib

import torch

# Keep in sync with csrc/common/dtype.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ptr(t: torch.Tensor | None) -> int:
    """The device address of t's first element (0 for None)."""
    return 0 if t is None else t.data_ptr()


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def stream(device: torch.device) -> int:
    """The current CUDA stream of `device`, as the integer handle the launchers take (0 for the
    CPU tensors of the tests' emulator, see _backend.cuda_emulated)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def on_device(device: torch.device):
    """Make `device` the current CUDA device for a launch (nothing to do for CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
