"""Modules over llmkern.ops."""

from .attention import CausalSelfAttention
from .layer_norm import LayerNorm
from .mlp import GeluMLP, SwiGLUMLP
from .rms_norm import RMSNorm
from .rotary import RotaryCache

__all__ = ["CausalSelfAttention", "GeluMLP", "LayerNorm", "RMSNorm", "RotaryCache", "SwiGLUMLP"]
