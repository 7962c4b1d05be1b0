"""Optimizers over llmkern's fused multi-tensor kernels, and Muon (per projection, per expert) beside AdamW for the
hidden matrices."""

from .adamw import AdamW
from .muon import Muon, MuonParameter, MuonWithAdamW, muon_parameters

__all__ = ["AdamW", "Muon", "MuonParameter", "MuonWithAdamW", "muon_parameters"]
