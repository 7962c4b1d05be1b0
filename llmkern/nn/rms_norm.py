from __future__ import annotations

import torch
from torch import nn

from ..ops._norm import module_inputs
from ..ops.rms_norm import rms_norm
from ._dispatch import module_backend, op_backend


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, with a learned scale (initialised to ones).

    forward(x) returns the normed x; forward(x, residual) returns (normed, x + residual),
    the pre-norm residual stream of a transformer block in one pass.

    Under autocast the stream is fp32 while the matmuls around the norm are 16-bit: a 16-bit
    branch x joins an fp32 residual as it is, and the normed output comes out in autocast's dtype,
    what the next matmul reads; the kernels convert on the fly, so no cast kernel runs on either side.
    """

    def __init__(self, dim: int, eps: float = 1e-6, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.backend = module_backend(backend)
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """The weight back to ones. Like torch's norms, so that a model built on the meta device and
        materialized with to_empty() (FSDP's param_init, the reset_parameters() recipe) gets it."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        x, out_dtype = module_inputs(x, residual)
        # Through op_backend, as every module's op: a model built for a backend that cannot run here
        # runs its norms on torch with a warning, like its LayerNorm, attention, RoPE and SwiGLU.
        backend = op_backend("rms_norm", self.backend, x.device)
        return rms_norm(x, self.weight, self.eps, residual=residual, backend=backend, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
