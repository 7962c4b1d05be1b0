"""Optimizers over llmkern's fused multi-tensor kernels, and Muon beside AdamW for the hidden matrices."""

from .adamw import AdamW
from .muon import MuonWithAdamW, muon_parameters

__all__ = ["AdamW", "MuonWithAdamW", "muon_parameters"]
