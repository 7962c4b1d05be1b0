"""Attention (placeholder until the fused kernels land: the torch backend only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend


def attention(q, k, v, causal: bool = True, scale: float | None = None, backend: str | None = None):
    """Drop-in for F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale); (B, H, S, D)."""
    _backend.resolve("attention", backend, q.device)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=k.size(1) != q.size(1))
