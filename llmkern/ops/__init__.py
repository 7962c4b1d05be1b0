"""The public functional ops. Each accepts backend="auto" | "cuda" | "triton" | "torch"."""

from .attention import attention
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .geglu import geglu
from .layer_norm import layer_norm
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = ["attention", "fused_linear_cross_entropy", "geglu", "layer_norm", "rms_norm", "rope", "swiglu"]
