"""The Triton row kernel of the fused linear + cross-entropy: each row's loss from its logits, and
d loss / d logits written over them. The chunk loop around it (the matmuls, the gradients) is
llmkern/ops/_chunked_linear_cross_entropy.py.

With a soft cap C (Gemma 2's final_logit_softcapping) the loss is that of the capped logits
C * tanh(z / C): both passes cap each logit as they load it (in fp32, with attention's _soft_cap, whose
tanh, from llmkern/triton/_math.py, keeps the relative precision of logits far below the cap), and pass 2
multiplies the capped logits' gradient by the cap's slope 1 - tanh^2, so what is written
over the logits is the gradient of the raw ones, which the chunk loop's matmuls need. HAS_SOFTCAP is
a constexpr: without a cap the kernel is the one without the feature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cuda_bridge import on_device
from .attention import _soft_cap

MAX_BLOCK = 4096


@triton.jit
def _row_stats(row_ptr, cols, n_classes, row_max, sum_exp, sum_z, softcap, TAIL: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr):
    """Pass 1 over one block of columns: the running max, the sum of exp(z - max) (rescaled when
    the max grows) and the sum of z, of the capped z with HAS_SOFTCAP. Only the tail block, past the
    last whole one, is masked: a mask that may change inside a 16-byte pack keeps Triton from
    vectorizing the loads."""
    if TAIL:
        z = tl.load(row_ptr + cols, mask=cols < n_classes, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:  # the cap would make the columns past the row -softcap: they must stay -inf
            z = tl.where(cols < n_classes, _soft_cap(z, 1.0, softcap)[0], -float("inf"))
        z_sum = tl.sum(tl.where(cols < n_classes, z, 0.0), axis=0)
    else:
        z = tl.load(row_ptr + cols).to(tl.float32)
        if HAS_SOFTCAP:
            z = _soft_cap(z, 1.0, softcap)[0]
        z_sum = tl.sum(z, axis=0)
    new_max = tl.maximum(row_max, tl.max(z, axis=0))
    # -inf so far (a block of banned classes, logits of -inf): exp(-inf - -inf) would be NaN. Shifting by
    # 0 then adds their exp(-inf) = 0 and keeps the empty sum 0.
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    sum_exp = sum_exp * tl.exp(row_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
    return new_max, sum_exp, sum_z + z_sum


@triton.jit
def _write_grad(row_ptr, cols, n_classes, lse, target, valid, in_range, scale, label_smoothing, softcap,
                TAIL: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Pass 2 over one block of columns: d loss / d z = softmax(z) - (1 - eps) * onehot(target) - eps / n_classes,
    scaled, written over z (masked only in the tail block, as in _row_stats). With HAS_SOFTCAP, z is
    capped first and the gradient taken through the cap (times its slope) to the raw z."""
    if TAIL:
        z = tl.load(row_ptr + cols, mask=cols < n_classes, other=0.0).to(tl.float32)
    else:
        z = tl.load(row_ptr + cols).to(tl.float32)
    if HAS_SOFTCAP:
        z, cap_slope = _soft_cap(z, 1.0, softcap)
    grad = tl.exp(z - lse) - label_smoothing / n_classes - tl.where(cols == target, 1.0 - label_smoothing, 0.0)
    if HAS_SOFTCAP:
        grad = grad * cap_slope
    grad = tl.where(valid, grad * scale, 0.0)
    grad = tl.where(valid & ~in_range, float("nan"), grad).to(row_ptr.dtype.element_ty)
    if TAIL:
        tl.store(row_ptr + cols, grad, mask=cols < n_classes)
    else:
        tl.store(row_ptr + cols, grad)


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS,  # (rows, n_classes) in the matmul dtype, row stride logits_stride; gets d loss / d logits
    TARGET,  # (rows,) int32 or int64 class ids; ignore_index marks rows without a loss
    LOSS,  # (rows,) fp32: each row's loss (0 for ignored rows, NaN for a target out of range)
    GRAD_SCALE,  # (1,) fp32: d reduced loss / d row loss (1 / n_valid for "mean", 1 for "sum")
    logits_stride,  # elements between rows of LOGITS
    n_classes,
    ignore_index,
    label_smoothing,  # epsilon: the target gets 1 - eps of the probability, each class eps / n_classes
    softcap,  # C > 0: the loss is that of the capped logits C * tanh(z / C) (read only with HAS_SOFTCAP)
    COMPUTE_GRAD: tl.constexpr,  # False: only the loss (nothing needs a gradient)
    HAS_SOFTCAP: tl.constexpr,  # False: no cap, and the kernel is the one without the feature
    BLOCK: tl.constexpr,  # classes per step
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * logits_stride
    offs = tl.arange(0, BLOCK)
    target = tl.load(TARGET + row).to(tl.int64)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_classes)
    whole = n_classes // BLOCK * BLOCK  # columns in whole blocks; the rest is the tail

    # Pass 1: the log-sum-exp of the row, and the sum of its logits (label smoothing).
    row_max = -float("inf")
    sum_exp = 0.0
    sum_z = 0.0
    for start in range(0, whole, BLOCK):
        row_max, sum_exp, sum_z = _row_stats(row_ptr, start + offs, n_classes, row_max, sum_exp, sum_z, softcap,
                                             False, HAS_SOFTCAP)
    if whole < n_classes:
        row_max, sum_exp, sum_z = _row_stats(row_ptr, whole + offs, n_classes, row_max, sum_exp, sum_z, softcap,
                                             True, HAS_SOFTCAP)
    lse = row_max + tl.log(sum_exp)

    target_z = tl.load(row_ptr + target, mask=valid & in_range, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        target_z = _soft_cap(target_z, 1.0, softcap)[0]
    # The smoothing term only with smoothing: a logit of -inf makes sum_z -inf, and 0 * inf is NaN.
    smoothed = label_smoothing * tl.where(label_smoothing > 0, lse - sum_z / n_classes, 0.0)
    loss = (1.0 - label_smoothing) * (lse - target_z) + smoothed
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(valid & ~in_range, float("nan"), loss)  # a bad target is never silently a number
    tl.store(LOSS + row, loss)

    if COMPUTE_GRAD:
        # Every thread loaded target_z above (and thread 0 stores the loss from its copy), while
        # pass 2 overwrites the row, target column included, from whichever warp owns it. Nothing
        # orders one warp's load before another warp's store (the interpreter runs them in turn),
        # so without this barrier a late warp could read the gradient as the target's logit.
        tl.debug_barrier()
        # Pass 2: the gradient over the logits.
        scale = tl.load(GRAD_SCALE)
        for start in range(0, whole, BLOCK):
            _write_grad(row_ptr, start + offs, n_classes, lse, target, valid, in_range, scale, label_smoothing,
                        softcap, False, HAS_SOFTCAP)
        if whole < n_classes:
            _write_grad(row_ptr, whole + offs, n_classes, lse, target, valid, in_range, scale, label_smoothing,
                        softcap, True, HAS_SOFTCAP)


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

    logits (rows, V) with a unit column stride; target (rows,) contiguous; grad_scale (1,) fp32.
    softcap > 0: the loss of the capped logits softcap * tanh(logits / softcap), and the gradient of the
    raw logits through the cap; 0: no cap.
    """
    n_rows, n_classes = logits.shape
    if n_rows == 0:
        return
    block = min(triton.next_power_of_2(n_classes), MAX_BLOCK)
    num_warps = 4 if block <= 1024 else 8
    with on_device(logits.device):  # Triton launches on the current GPU, which need not be logits'
        _cross_entropy_rows_kernel[(n_rows,)](
            logits, target, loss, grad_scale,
            logits.stride(0), n_classes, ignore_index, float(label_smoothing), float(softcap),
            COMPUTE_GRAD=compute_grad, HAS_SOFTCAP=softcap > 0, BLOCK=block, num_warps=num_warps,
        )
