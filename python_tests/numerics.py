"""The numerics rule of DESIGN.md, shared by every op test.

A low-precision result passes when its max error against a float64 reference is at most twice
(plus a small atol) the error of PyTorch's own low-precision computation of the same thing.
"""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a64 = a.detach().to(torch.float64)
    if torch.isnan(a64).any():
        return float("inf")  # NaN never passes (outputs are pre-filled with NaN)
    return (a64 - ref.detach().to(torch.float64)).abs().max().item() if a.numel() else 0.0


# One unit in the last place at magnitude 1: a rounding that lands on the other side of a
# tie is not a defect, even where torch's own result happens to be exact.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, name: str,
                        atol: float | None = None, factor: float = 2.0) -> None:
    """out (ours) vs ref64 (float64 truth), allowing factor x torch_lowp's own error + atol (relative to
    the reference's largest magnitude when that exceeds 1)."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if atol is None:
        atol = ATOL[out.dtype]
    ours = max_err(out, ref64)
    theirs = max_err(torch_lowp, ref64)
    scale = max(1.0, ref64.detach().abs().max().item()) if ref64.numel() else 1.0
    bound = factor * theirs + atol * scale
    if not ours <= bound:
        raise AssertionError(f"{name}: max error {ours:.3e} > {factor} x torch's {theirs:.3e} + {atol:.0e}")


class InfGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: `InfGradient.apply(loss)` is a float16
    overflow with a finite loss, for the tests of loss scaling."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")
