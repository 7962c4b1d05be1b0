"""The public functional ops. Each accepts backend="auto" | "cuda" | "triton" | "torch"."""

from .attention import attention
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = ["attention", "rms_norm", "rope", "swiglu"]
