"""Modules over llmkern.ops."""

from .attention import CausalSelfAttention
from .layer_norm import LayerNorm
from .mlp import GatedMLP, GeluMLP, SwiGLUMLP
from .rms_norm import RMSNorm
from .rotary import RotaryCache

__all__ = ["CausalSelfAttention", "GatedMLP", "GeluMLP", "LayerNorm", "RMSNorm", "RotaryCache", "SwiGLUMLP"]
