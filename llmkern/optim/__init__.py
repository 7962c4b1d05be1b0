"""Optimizers over llmkern's fused multi-tensor kernels."""

from .adamw import AdamW

__all__ = ["AdamW"]
