"""The chunk loop of the fused linear + cross-entropy, shared by the triton and cuda backends.

The rows of x are walked in chunks. For each chunk:
    logits = x_c @ W^T (+ b)                    torch matmul in x's dtype (fp32 accumulate in cuBLAS)
    the backend's row kernel, per row:          logsumexp and the target's logit in fp32, the row's
                                                loss, and d loss / d logits written over the logits
                                                (llmkern/triton/ and csrc/cuda/fused_linear_cross_entropy)
    grad_x_c  = dlogits @ W                     into the chunk's rows of grad_x
    grad_W   += dlogits^T @ x_c                 accumulated over chunks in fp32
So only one chunk of logits exists at a time (CHUNK_BYTES), and the gradients are ready when the
forward returns: the backward only scales them by the incoming gradient of the loss.

With a soft cap (Gemma 2's final logits, softcap * tanh(z / softcap)) only the row kernel changes: it
caps each logit as it reads it and writes the gradient of the raw logits (through the cap's slope), so
the logits and the matmuls stay those of the plain linear layer.

Why, in float16, dlogits is the gradient of the sum of the row losses, not of their mean: its
entries are then in [-1, 1], where "mean"'s 1 / n_valid would bring a small probability of a large
batch (2e-5 / 16384) below float16's smallest number before the backward's loss scale (65536, say)
could lift it, and grad_x would lose it. The mean's factor is applied in fp32 instead: to grad_W and
grad_b at the end of the forward, and to grad_x with the incoming gradient in the backward
(defers_row_scale). bf16 and fp32 have the range for the mean's gradients, and a later scaling
would only add a rounding to grad_x.

Why grad_W is accumulated in fp32: summing the chunks' products in 16 bits would add one rounding
per chunk to the single one of PyTorch's own 16-bit weight gradient. Where torch.addmm can add a
16-bit product into an fp32 tensor (CUDA on recent PyTorch) cuBLAS does the sum in fp32; elsewhere
each chunk's bf16 product is rounded once to bf16 and then summed in fp32, which keeps the error at
about that single rounding, and a float16 product is taken in fp32 (in float16 it could overflow).
The fp32 buffer costs V * H * 4 bytes (154 MB for GPT-2's head).
"""

from __future__ import annotations

from typing import Callable

import torch

# The logits of one chunk take at most this many bytes (at least one row, whatever its size).
CHUNK_BYTES = 256 * 2**20
# Rows of the logits buffer are padded to this many elements: a row stride cuBLAS's tensor-core
# kernels accept for 16-bit types whatever the vocabulary size (50257 -> 50304).
ROW_ALIGN = 64


def chunk_rows_for(n_classes: int, element_size: int) -> int:
    """Rows per chunk so that one chunk of logits fits CHUNK_BYTES."""
    padded = _round_up(n_classes, ROW_ALIGN)
    return max(1, CHUNK_BYTES // (padded * element_size))


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, for a and b in fp32 or one 16-bit dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _mixed_addmm_works(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # 16-bit operands, fp32 sum in cuBLAS
    elif a.dtype == torch.float16:  # a chunk's sum over rows of dlogits (in [-1, 1]) x may pass 65504
        acc.addmm_(a.float(), b.float())
    else:  # one bf16 rounding of this chunk's product, then an fp32 sum (see the module docstring)
        acc.add_(torch.mm(a, b))


_mixed_addmm: dict[tuple[str, torch.dtype], bool] = {}


def _mixed_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm can add a 16-bit product into an fp32 tensor in place here (CUDA, on
    recent PyTorch versions). Probed once per device type and dtype, with the result checked:
    where it is missing or misbehaves, the caller takes the portable path."""
    if device.type != "cuda":
        return False
    key = (device.type, dtype)
    if key not in _mixed_addmm:
        # Small integers, exact in 16 bits and in their products' sums; a transposed operand, as
        # in use. No random numbers: the probe must not move the generator of a seeded run.
        a = (torch.arange(16 * 8, device=device).reshape(16, 8) % 7 - 3).to(dtype).t()
        b = (torch.arange(16 * 8, device=device).reshape(16, 8) % 5 - 2).to(dtype)
        acc = torch.ones(8, 8, device=device)
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _mixed_addmm[key] = torch.equal(acc, 1 + a.float() @ b.float())
        except (RuntimeError, TypeError, NotImplementedError):
            _mixed_addmm[key] = False
    return _mixed_addmm[key]


def loss_per_row_loss(n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """d loss / d row loss, 0-d fp32, from the count of rows not ignored (0-d): 1 / n_valid for "mean"
    (1 when there are none: there is no gradient to scale then), 1 for "sum"."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=n_valid.device)
    return 1.0 / n_valid.clamp(min=1).to(torch.float32)


def defers_row_scale(dtype: torch.dtype) -> bool:
    """Whether the gradients of x in `dtype` are those of the summed row losses, to be scaled by
    loss_per_row_loss in the backward (float16: see the module docstring)."""
    return dtype == torch.float16


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float,
    need_grad_x: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_rows: int,
    num_classes: int,
    cross_entropy_rows: Callable[..., None],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss, grad_x, grad_weight, grad_bias) of the reduced cross-entropy of x @ weight^T + bias, capped
    to softcap * tanh(logits / softcap) first when softcap > 0 (0: no cap).

    x (N, H); weight (V, H) of x's dtype, or fp32 with a 16-bit x (cast once to x's dtype, as
    autocast would); target (N,) contiguous; bias (V,) or None. The classes are the first
    num_classes of the V rows; the gradients of the others (padding) are zeros. The gradients are
    those of the loss itself (d loss = 1), in the dtypes of x, weight and bias; None where not
    asked for. A float16 grad_x is that of the sum of the row losses (defers_row_scale).
    chunk_rows <= 0 picks the rows per chunk from CHUNK_BYTES. cross_entropy_rows: the backend's row
    kernel, cross_entropy_rows(logits, target, loss, grad_scale, ignore_index, label_smoothing, compute_grad,
    softcap), which caps the logits itself and writes the raw logits' gradient.
    """
    n_rows, _ = x.shape
    n_classes = num_classes
    dtype = x.dtype
    w = weight[:n_classes].to(dtype)
    b = None if bias is None else bias[:n_classes].to(dtype)
    compute_grad = need_grad_x or need_grad_weight or need_grad_bias
    if chunk_rows <= 0:
        chunk_rows = chunk_rows_for(n_classes, x.element_size())
    chunk_rows = max(1, min(chunk_rows, n_rows))

    n_valid = (target != ignore_index).sum()
    row_scale = loss_per_row_loss(n_valid, reduction)
    deferred = defers_row_scale(dtype)
    grad_scale = torch.ones(1, dtype=torch.float32, device=x.device) if deferred else row_scale.reshape(1)

    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need_grad_x else None
    # Zeros: the padding rows past n_classes keep them.
    grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad_weight else None
    grad_b32 = torch.zeros(weight.size(0), dtype=torch.float32, device=x.device) if need_grad_bias else None
    padded = torch.empty((chunk_rows, _round_up(n_classes, ROW_ALIGN)), dtype=dtype, device=x.device)

    # The dtypes are chosen above; autocast (still on inside a custom op) must not change them.
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, n_rows, chunk_rows):
            end = min(start + chunk_rows, n_rows)
            x_c = x[start:end]
            logits = padded[: end - start, :n_classes]
            if b is None:
                torch.mm(x_c, w.t(), out=logits)
            else:
                torch.addmm(b, x_c, w.t(), out=logits)
            cross_entropy_rows(
                logits, target[start:end], row_loss[start:end], grad_scale, ignore_index, label_smoothing,
                compute_grad, softcap,
            )
            # `logits` now holds d loss / d logits of these rows (of their summed losses when deferred).
            if need_grad_x:
                torch.mm(logits, w, out=grad_x[start:end])
            if need_grad_weight:
                _accumulate_product(grad_w32[:n_classes], logits.t(), x_c)
            if need_grad_bias:
                grad_b32[:n_classes].add_(logits.sum(dim=0, dtype=torch.float32))

    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / n_valid  # 0 / 0 = NaN with no valid row, as F.cross_entropy gives
    if deferred:  # from dlogits of the summed row losses
        for grad in (grad_w32, grad_b32):
            if grad is not None:
                grad.mul_(row_scale)
    grad_w = None if grad_w32 is None else grad_w32.to(weight.dtype)
    grad_b = None if grad_b32 is None else grad_b32.to(bias.dtype)
    return loss, grad_x, grad_w, grad_b

