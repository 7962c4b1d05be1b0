"""Triton kernels and their host launchers, one file per op (llmkern/triton/<op>.py)."""
