"""simt: llmkern's CUDA kernels run on the CPU, so a machine without a GPU tests them too.

simt.h says how and what it can and cannot find. Tests use it through the `simt` marker (see
conftest.py): inside such a test the "cuda" backend runs the emulated kernels on CPU tensors, the
way the "triton" backend runs Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import os

from .build import Unavailable, build, load

__all__ = ["Unavailable", "arch", "build", "emulating", "load", "module", "schedule"]

_module = None


def module():
    """The emulated `_cuda` module, built (or taken from build/simt) on first use."""
    global _module
    if _module is None:
        _module = load()
    return _module


@contextlib.contextmanager
def emulating(mod):
    """Inside the block llmkern's cuda backend is `mod` and accepts CPU tensors."""
    from llmkern import _backend
    from llmkern.nn import _dispatch

    # every answer about the cuda module is asked again of `mod`, and the modules' choices of backend
    # (which depend on what can run) are made again, inside the block and after it
    saved, saved_choices = dict(_backend._probed), dict(_dispatch._chosen)
    _backend._probed.clear()
    _dispatch._chosen.clear()
    _backend._probed["cuda_module"] = mod
    try:
        yield mod
    finally:
        _backend._probed.clear()
        _backend._probed.update(saved)
        _dispatch._chosen.clear()
        _dispatch._chosen.update(saved_choices)


@contextlib.contextmanager
def _environment(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def schedule(order: str):
    """Run the kernels launched in the block with threads and blocks in `order`:
    "forward", "reverse" or "random:SEED" (a race shows as a result that changes with it)."""
    return _environment("LLMKERN_SIMT_SCHEDULE", order)


def arch(name: str):
    """Emulate another GPU in the block: "sm75", "sm80", "sm86", "sm89" or "sm90" (the default),
    its compute capability and the shared memory a block may opt into."""
    return _environment("LLMKERN_SIMT_ARCH", name)
