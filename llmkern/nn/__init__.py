"""Modules over llmkern.ops."""

from .attention import CausalSelfAttention
from .layer_norm import LayerNorm
from .mlp import GatedMLP, GeluMLP, SwiGLUMLP
from .moe import MoEMLP, RouterStats, load_balancing_loss
from .rms_norm import RMSNorm
from .rotary import RotaryCache

__all__ = ["CausalSelfAttention", "GatedMLP", "GeluMLP", "LayerNorm", "MoEMLP", "RMSNorm", "RotaryCache",
           "RouterStats", "SwiGLUMLP", "load_balancing_loss"]
