"""Which backend a module passes to an op when the model asks for one backend everywhere.

A model built with backend="triton" (or "cuda") runs every op that has kernels there on that
backend, and the ops that do not have any yet on "torch", with a warning: the op layer itself
refuses a backend it cannot run, and a model should not fail because one small op has no
kernels yet. "auto" and None pass through unchanged (the op picks).
"""

from __future__ import annotations

import warnings

import torch

from .. import _backend


def module_backend(backend: str | None) -> str | None:
    """A module's backend argument, checked when the module is built: a typo ("trition") is a
    ValueError then, not a warning at the first forward that runs the op on torch instead."""
    return None if backend is None else _backend._validate(backend)


def op_backend(op: str, backend: str | None, device: torch.device) -> str | None:
    if backend in (None, "auto", "torch"):
        return backend
    # validated: a typo ("trition") would run on torch with a warning naming it as a backend
    return _explicit_backend(op, _backend._validate(backend), device.type)


# (op, backend, device type) -> the backend the modules pass. A plain dict, not functools.lru_cache:
# torch.compile traces through an lru_cache'd function with a warning that it ignores the cache.
_chosen: dict[tuple[str, str, str], str] = {}


def _explicit_backend(op: str, backend: str, device_type: str) -> str:
    key = (op, backend, device_type)
    if key in _chosen:
        return _chosen[key]
    chosen = backend if _backend.can_run(backend, op, torch.device(device_type)) else "torch"
    if torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn: an eager call warns and keeps it
        return chosen
    if chosen != backend:
        warnings.warn(f"llmkern: {op} has no {backend} kernels that run on {device_type}; using the torch "
                      "backend for it")
    _chosen[key] = chosen
    return chosen
