"""The public functional ops. Each accepts backend="auto" | "cuda" | "triton" | "torch"."""

from .attention import attention
from .rms_norm import rms_norm

__all__ = ["attention", "rms_norm"]
