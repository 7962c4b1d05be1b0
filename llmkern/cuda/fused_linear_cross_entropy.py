"""Launch csrc/cuda/fused_linear_cross_entropy.cu: the row kernel of the fused linear +
cross-entropy (the chunk loop around it is llmkern/ops/_chunked_linear_cross_entropy.py)."""

from __future__ import annotations

import torch

from .. import _backend
from .._cuda_bridge import dtype_code, on_device, ptr, stream


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    loss: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool,
    softcap: float = 0.0,
) -> None:
    """Per-row loss into `loss` (fp32) and, when compute_grad, d loss / d logits over `logits`.

    logits (rows, V) with a unit column stride; target (rows,) int32 or int64; grad_scale (1,) fp32.
    softcap > 0: the loss of the capped logits softcap * tanh(logits / softcap), and the gradient of the
    raw logits through the cap; 0: no cap.
    """
    rows, n_classes = logits.shape
    if rows == 0:
        return
    target = target.to(torch.int64).contiguous()  # the kernel reads int64 ids (a copy only for int32)
    with on_device(logits.device):
        _backend.cuda_module().fused_linear_cross_entropy_rows(
            ptr(logits), ptr(target), ptr(loss), ptr(grad_scale),
            rows, n_classes, logits.stride(0), int(ignore_index), float(label_smoothing),
            float(softcap), bool(compute_grad),
            dtype_code(logits.dtype), stream(logits.device),
        )
