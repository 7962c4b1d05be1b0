"""Triton kernels and their host launchers, one file per op (llmkern/triton/<op>.py)."""

from ._compat import patch_interpreter as _patch_interpreter

_patch_interpreter()
