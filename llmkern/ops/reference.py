"""Plain-PyTorch reference of every op: the "torch" backend and the tests' oracle.

Each function computes in fp32 (or in the input's precision when that is float64) and returns
the input's dtype, so it serves both as a readable definition and as a ground truth when
called on float64 inputs.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
):
    """y = h / sqrt(mean(h**2, -1) + eps) * weight, with h = x (+ residual).

    Returns y, or (y, h) when residual is given: h is the pre-norm residual stream, rounded
    to x's dtype as a transformer would store it, and the norm is taken of that rounded h.
    """
    h = x if residual is None else x + residual
    ct = _compute_dtype(h.dtype)
    hf = h.to(ct)
    rstd = torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(ct)).to(x.dtype)
    return y if residual is None else (y, h)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None):
    """Softmax attention in fp32, layout (B, H, S, D); k and v may have fewer heads (GQA)."""
    hq, hkv = q.size(1), k.size(1)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    ct = _compute_dtype(q.dtype)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    scores = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if causal:
        sq, sk = q.size(2), k.size(2)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(ct)).to(q.dtype)
