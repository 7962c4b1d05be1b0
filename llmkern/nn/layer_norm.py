from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import FLOAT_DTYPES
from ..ops._norm import MAX_HIDDEN, module_inputs
from ..ops.layer_norm import layer_norm
from ._dispatch import module_backend, op_backend


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (same parameters and state dict) through llmkern.ops.layer_norm, with
    RMSNorm's residual form, so a block can use either norm alike: forward(x) -> normed x;
    forward(x, residual) -> (normed h, h) with h = x + residual in residual's dtype, in one pass.

    Under autocast the stream is fp32 while the matmuls around the norm are 16-bit: a 16-bit branch
    x joins an fp32 residual as it is, and the normed output comes out in autocast's dtype, what the
    next matmul reads; the kernels convert on the fly, so no add or cast kernel runs on either side.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = module_backend(backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if not self._op_takes(x, residual):  # torch's own, as nn.LayerNorm always did
            h = x if residual is None else residual + x
            y = F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps)
            return y if residual is None else (y, h)
        x, out_dtype = module_inputs(x, residual)
        backend = op_backend("layer_norm", self.backend, x.device)
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, backend=backend,
                          out_dtype=out_dtype)

    def _op_takes(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether llmkern.ops.layer_norm covers this call: a weight over one dimension of at most
        MAX_HIDDEN, in fp32, fp16 or bf16 tensors (float64, say, stays with torch's LayerNorm)."""
        tensors = [t for t in (x, residual, self.weight) if t is not None]
        return (self.weight is not None and len(self.normalized_shape) == 1
                and self.normalized_shape[0] <= MAX_HIDDEN and all(t.dtype in FLOAT_DTYPES for t in tensors))
