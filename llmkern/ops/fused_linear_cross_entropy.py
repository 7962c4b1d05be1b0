"""Cross-entropy of a linear layer's output (the LM head and its loss) without materialising the logits.

    loss = cross_entropy(x @ weight^T + bias, target)    reduced by "mean" over non-ignored rows, or "sum"

or, with Gemma 2's soft cap C (softcap=), the cross-entropy of the capped logits C * tanh(logits / C).

For GPT-2 at batch 16 x 1024 the logits alone are 16384 x 50304 (1.6 GB in bf16, plus their
gradient); the triton and cuda backends walk the rows in chunks so that only one chunk of logits
exists, and compute the gradients of x, weight and bias during the forward (see
llmkern/ops/_chunked_linear_cross_entropy.py). The backward then only scales them by the incoming
gradient. It runs through the custom op llmkern::fused_linear_cross_entropy (fake kernel and
autograd registered, so torch.compile(fullgraph=True) traces it); the torch backend is the plain
reference (the full logits, then F.cross_entropy in fp32), differentiated by PyTorch itself.
The matmuls are cuBLAS's on both kernel backends; what differs is the row kernel (the softmax,
the loss and the logits' gradient of a chunk): Triton's or csrc/cuda/fused_linear_cross_entropy.cu.

A vocabulary padded for speed (GPT-2's 50257 to 50304) passes the whole padded weight with
num_classes = the real vocabulary: the padding rows take no part in the loss, and their gradient
is written as zeros by the op itself, where slicing the weight outside would make autograd
zero-fill and copy a second weight-sized gradient.

The soft cap is applied by the row kernels (in fp32, as they read each logit), which also take the
logits' gradient through it, so a capped head costs no more memory than a plain one; the torch
backend (the reference) caps the full logits in fp32 before F.cross_entropy.

Targets out of range (neither in [0, num_classes) nor ignore_index) are not checked on the host, which
would wait for the GPU: the triton backend gives such a row a NaN loss and NaN gradients, so the
loss is NaN; the torch backend raises (on a CPU) or asserts on the device, as F.cross_entropy does.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import _backend
from . import _checks, _chunked_linear_cross_entropy, reference
from ._custom_op import CustomOp

REDUCTIONS = ("mean", "sum")
_KERNEL_DTYPES = _checks.FLOAT_DTYPES  # triton and cuda
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)
_TARGET_DTYPES = (torch.int64, torch.int32)


def fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    backend: str | None = None,
    chunk_rows: int | None = None,
    num_classes: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The cross-entropy loss of the logits x @ weight^T + bias (soft-capped with softcap) against target,
    as a 0-d fp32 tensor.

    Args:
        x: (N, H) or (..., H) float32, float16 or bfloat16 (float64 on the torch backend). Under
            autocast a float32 x is cast to the autocast dtype first, as a Linear layer's input is.
        weight: (V, H), x's dtype; or float32 with a 16-bit x (fp32 parameters under autocast:
            the matmuls run in x's dtype and the weight's gradient comes back in float32).
        target: x.shape[:-1] or (N,) int64 (or int32) class ids in [0, num_classes), or ignore_index.
        bias: optional (V,), weight's dtype.
        ignore_index: rows with this target add nothing to the loss nor to the gradients.
        reduction: "mean" (over the non-ignored rows; NaN when there are none, as in
            F.cross_entropy) or "sum".
        label_smoothing: in [0, 1]; the target class gets 1 - eps, every class eps / V.
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
        chunk_rows: rows of logits that exist at once (cuda and triton backends); None picks a
            chunk of about 256 MB of logits.
        num_classes: the classes are the first num_classes rows of weight (and entries of bias);
            the rest, padding, get no probability and a zero gradient. None means all V.
        softcap: Gemma 2's final_logit_softcapping C: the loss is that of C * tanh(logits / C), and
            every gradient goes through the cap. None or 0 means no cap; else a number > 0, finite in
            float32 (the kernels take it in fp32).
    """
    _checks.check_tensor("x", x)
    # Before the checks, which then see the x the matmuls take (a weight in the autocast dtype fits it).
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    _check_args(x, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_rows, num_classes)
    cap = _checked_softcap(softcap)
    # NumPy scalars (checked above) as Python numbers, which the custom op's schema and F.cross_entropy take
    ignore_index, label_smoothing = int(ignore_index), float(label_smoothing)
    n_classes = weight.size(0) if num_classes is None else int(num_classes)
    device = _checks.check_same_device(x=x, weight=weight, target=target, bias=bias)
    chosen = _backend.resolve(
        "fused_linear_cross_entropy", backend, device, fits=lambda b: b == "torch" or x.dtype in _KERNEL_DTYPES
    )
    x2 = x.flatten(0, -2)  # (N, H); not reshape(-1, H), which cannot infer N when H is 0
    target1 = target.reshape(-1)
    if chosen == "torch":
        return reference.fused_linear_cross_entropy(
            x2, weight, target1, bias, ignore_index, reduction, label_smoothing, n_classes, cap
        )
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 for the {chosen} backend; got {x.dtype}")
    grad_on = torch.is_grad_enabled()
    loss, _, _, _ = _fused_linear_cross_entropy_op(
        x2, weight, target1.contiguous(), bias, int(ignore_index), reduction, float(label_smoothing), cap,
        grad_on and x2.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, 0 if chunk_rows is None else int(chunk_rows),
        n_classes, chosen,
    )
    return loss


def _checked_softcap(softcap) -> float:
    """The cap as the kernels take it: a float > 0 within float32's range, or 0.0 for none (softcap None or 0)."""
    if softcap is None:
        return 0.0
    # numbers.Real, not float: an int cap (30) and a NumPy scalar from a config are taken
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    if softcap == 0:
        return 0.0
    if not 0 < softcap < math.inf:  # NaN fails this too
        raise ValueError(f"softcap must be a finite number > 0 (or None or 0 for no cap), got {softcap}")
    # The kernels take it in fp32: a cap that rounds to inf there makes NaN losses, one that rounds to 0
    # is no cap at all in the cuda kernel.
    return _checks.check_positive_float("softcap", softcap)


def _check_args(x, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_rows, num_classes) -> None:
    _checks.check_float("x", x, _DTYPES)
    _checks.check_float("weight", weight, _DTYPES)
    _checks.check_tensor("target", target)
    if x.dim() < 2:
        raise ValueError(f"x must be (N, H) or (..., H); got shape {tuple(x.shape)}")
    hidden = x.size(-1)
    if weight.dim() != 2 or weight.size(1) != hidden or weight.size(0) < 1:
        raise ValueError(
            f"weight must be (V, {hidden}) with V >= 1 to match x's last dimension; got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype and not (weight.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"weight must have x's dtype ({x.dtype}), or float32 with a 16-bit x; got {weight.dtype}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must hold int64 (or int32) class ids; got {target.dtype}")
    n_rows = math.prod(x.shape[:-1])  # not x.numel() // hidden: hidden may be 0
    if target.shape != x.shape[:-1] and target.shape != (n_rows,):
        raise ValueError(
            f"target must have shape {tuple(x.shape[:-1])} or ({n_rows},) to match x {tuple(x.shape)}; "
            f"got {tuple(target.shape)}"
        )
    if bias is not None:
        _checks.check_float("bias", bias, _DTYPES)
        if bias.shape != (weight.size(0),):
            raise ValueError(f"bias must have shape ({weight.size(0)},) to match weight; got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype ({weight.dtype}); got {bias.dtype}")
    # numbers.Integral and numbers.Real, not int and float: NumPy scalars (a config read with NumPy) are taken
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= int(ignore_index) < 2**63:  # compared with int64 targets by every backend
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral):
            raise TypeError(f"chunk_rows must be an int or None, got {type(chunk_rows).__name__}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
        if not 1 <= num_classes <= weight.size(0):
            raise ValueError(f"num_classes must be in [1, {weight.size(0)}] (weight's rows), got {num_classes}")


def _fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float,
    need_grad_x: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_rows: int,
    num_classes: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_weight, grad_bias) for d loss = 1 (a float16 grad_x for the sum of the row
    losses: _chunked_linear_cross_entropy.defers_row_scale); an unneeded gradient is an empty tensor.
    The classes are weight's first num_classes rows; softcap > 0 caps their logits (0: no cap).
    backend: whose row kernel runs, "cuda" or "triton"."""
    if backend == "cuda":
        from ..cuda import fused_linear_cross_entropy as kernels
    else:
        from ..triton import fused_linear_cross_entropy as kernels

    loss, grad_x, grad_w, grad_b = _chunked_linear_cross_entropy.forward(
        x, weight, target, bias, ignore_index, reduction, label_smoothing, softcap,
        need_grad_x, need_grad_weight, need_grad_bias, chunk_rows, num_classes, kernels.cross_entropy_rows,
    )
    return loss, _or_empty(grad_x, x), _or_empty(grad_w, weight), _or_empty(grad_b, weight)


def _or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if grad is None else grad


def _fused_linear_cross_entropy_fake(x, weight, target, bias, ignore_index, reduction, label_smoothing, softcap,
                                     need_grad_x, need_grad_weight, need_grad_bias, chunk_rows, num_classes, backend):
    loss = x.new_empty((), dtype=torch.float32)
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty(0)
    # contiguous whatever weight's and bias's strides: the real ones are fresh fp32 buffers cast back
    grad_w = weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0)
    grad_b = bias.new_empty(bias.shape) if need_grad_bias and bias is not None else weight.new_empty(0)
    return loss, grad_x, grad_w, grad_b


def _setup_context(ctx, inputs, output):
    _, _, target, _, ignore_index, reduction = inputs[:6]
    _, grad_x, grad_w, grad_b = output
    ctx.save_for_backward(grad_x, grad_w, grad_b, target)
    ctx.ignore_index, ctx.reduction = ignore_index, reduction
    ctx.needs = inputs[8:11]  # need_grad_x, need_grad_weight, need_grad_bias
    # The gradient outputs never get a gradient (the public op returns the loss alone): without this, autograd
    # would zero-fill one of x's and one of weight's size for them, in every backward, for nothing.
    ctx.set_materialize_grads(False)


def _scale(
    grad_x: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor, d_loss: torch.Tensor, d_x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's gradients (empty where not asked for) scaled: grad_w and grad_b by d_loss, grad_x by
    d_x (d_loss, or for a grad_x of the summed row losses d_loss * d loss / d row loss)."""
    return grad_x * d_x, grad_w * d_loss, grad_b * d_loss


# No autograd formula: the forward's gradients have no graph of their own, so a double backward
# through this op is an error (torch.library's, naming it), never a silent zero.
_scale_op = CustomOp("llmkern::fused_linear_cross_entropy_backward", _scale, _scale)


def _backward(ctx, d_loss, _d_grad_x, _d_grad_w, _d_grad_b):
    """The gradients were computed in the forward for d loss = 1: scale them by d_loss. A float16 grad_x,
    that of the summed row losses, gets d loss / d row loss too, in fp32 with d_loss, so that a loss
    scale lifts it before it is rounded to float16."""
    grad_x, grad_w, grad_b, target = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs
    if d_loss is None:  # only the gradient outputs were differentiated (torch.ops.llmkern...): they have no graph
        return (None,) * 14
    d_x = d_loss
    if _chunked_linear_cross_entropy.defers_row_scale(grad_x.dtype):
        n_valid = (target != ctx.ignore_index).sum()
        d_x = d_loss * _chunked_linear_cross_entropy.loss_per_row_loss(n_valid, ctx.reduction)
    grad_x, grad_w, grad_b = _scale_op(grad_x, grad_w, grad_b, d_loss, d_x)
    return (
        grad_x if need_x else None,
        grad_w if need_w else None,
        None,  # target
        grad_b if need_b else None,
        None, None, None, None, None, None, None, None, None, None,  # ignore_index ... backend
    )


_fused_linear_cross_entropy_op = CustomOp("llmkern::fused_linear_cross_entropy", _fused_linear_cross_entropy,
                                            _fused_linear_cross_entropy_fake, _setup_context, _backward)
