"""Which backend a module passes to an op when the model asks for one backend everywhere.

A model built with backend="triton" (or "cuda") runs every op that has kernels there on that
backend, and the ops that do not have any yet on "torch", with a warning: the op layer itself
refuses a backend it cannot run, and a model should not fail because one small op has no
kernels yet. "auto" and None pass through unchanged (the op picks).
"""

from __future__ import annotations

import functools
import warnings

import torch

from .. import _backend


def op_backend(op: str, backend: str | None, device: torch.device) -> str | None:
    if backend in (None, "auto", "torch"):
        return backend
    return _explicit_backend(op, backend, device.type)


@functools.lru_cache(maxsize=None)
def _explicit_backend(op: str, backend: str, device_type: str) -> str:
    if _backend.can_run(backend, op, torch.device(device_type)):
        return backend
    if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn
        warnings.warn(f"llmkern: {op} has no {backend} kernels that run on {device_type}; using the torch backend for it")
    return "torch"
