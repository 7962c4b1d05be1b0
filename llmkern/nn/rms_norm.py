from __future__ import annotations

import torch
from torch import nn

from ..ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, with a learned scale (initialised to ones).

    forward(x) returns the normed x; forward(x, residual) returns (normed, x + residual),
    the pre-norm residual stream of a transformer block in one pass. x is taken to residual's
    dtype first (the stream's: fp32 under autocast, where a block's branch comes out bf16).
    """

    def __init__(self, dim: int, eps: float = 1e-6, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None and x.dtype != residual.dtype:
            x = x.to(residual.dtype)  # the op adds tensors of one dtype
        return rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
