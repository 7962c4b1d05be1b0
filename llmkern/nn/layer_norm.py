from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with RMSNorm's residual form, so a block can use either norm alike:
    forward(x) -> normed x; forward(x, residual) -> (normed h, h) with h = x + residual, in the wider
    of the two dtypes (a bf16 branch added to an fp32 stream: one kernel, no cast before it)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return super().forward(x)
        h = residual + x  # type promotion: residual's fp32 whatever x's dtype
        return F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps), h
