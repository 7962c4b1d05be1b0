"""Launch csrc/cuda/attention.cu (forward) and attention_backward.cu; the op in
llmkern/ops/attention.py checked every argument.

The kernels copy rows as 16-byte chunks, so a tensor whose pointer or strides don't allow that
is copied to a contiguous one first (never the case for (B, H, S, D) tensors or the views of a
fused QKV projection with D a multiple of 8).
"""

from __future__ import annotations

import os

import torch

from .. import _backend
from .._cuda_bridge import dtype_code, on_device, ptr, stream
from ..ops.attention import int32_doc_ids


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernel's 16-byte row copies can read it in place, else a contiguous copy."""
    if t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3]):
        return t
    # Not t.contiguous(): a contiguous view at a misaligned offset would come back as is.
    return t.clone(memory_format=torch.contiguous_format)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _doc_ids(doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """doc_ids as the kernels read them: (B, S) int32, contiguous (row b starts at b * S).

    The ops already pass that (llmkern.ops.attention.int32_doc_ids); a direct call of these
    launchers with int64 or strided ids would otherwise be misread silently (no copy when the ids
    are already in that form).
    """
    return None if doc_ids is None else int32_doc_ids(doc_ids)


# Query rows per forward block: 64 (4 warps) or 128 (8 warps, each k/v tile read once for twice the
# rows). Which is faster on which GPU is for bench_attention to say; it sets this to compare them.
FORWARD_ROWS_ENV = "LLMKERN_CUDA_ATTENTION_ROWS"


def forward_block_rows() -> int:
    text = os.environ.get(FORWARD_ROWS_ENV, "64")
    if text not in ("64", "128"):
        raise ValueError(f"{FORWARD_ROWS_ENV} must be 64 or 128, got {text!r}")
    return int(text)


def _kernel_window(window: int, seq_k: int) -> int:
    """window as the kernels' C int: any window of seq_k keys or more masks nothing, so cap it there."""
    return int(min(window, seq_k))


def forward(q, k, v, doc_ids, causal: bool, window: int, scale: float, o, lse) -> None:
    """o = attention(q, k, v) and lse (B, Hq, Sq) fp32, written in place; window 0: no sliding window."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    doc_ids = _doc_ids(doc_ids)
    if o.data_ptr() % 16 != 0 or any(s % 8 != 0 for s in _strides(o)):
        raise ValueError(f"o must be 16-byte aligned with strides that are multiples of 8; got {o.stride()}")
    if not lse.is_contiguous():
        raise ValueError("lse must be contiguous")
    b, hq, sq, d = q.shape
    hkv, sk = k.size(1), k.size(2)
    with on_device(q.device):
        _backend.cuda_module().attention_forward(
            ptr(q), ptr(k), ptr(v), ptr(doc_ids), ptr(o), ptr(lse),
            b, hq, hkv, sq, sk, d,
            _strides(q), _strides(k), _strides(v), _strides(o),
            float(scale), bool(causal), _kernel_window(window, sk), dtype_code(q.dtype), forward_block_rows(),
            stream(q.device),
        )


def backward(do, q, k, v, o, lse, doc_ids, causal: bool, window: int, scale: float, dq, dk, dv) -> None:
    """dq, dk, dv (written in place) from the output gradient do and the forward's o and lse."""
    q, k, v, o, do = (_aligned(t) for t in (q, k, v, o, do))
    doc_ids = _doc_ids(doc_ids)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        if t.data_ptr() % 16 != 0 or any(s % 8 != 0 for s in _strides(t)):
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of 8; got {t.stride()}")
    if not lse.is_contiguous():
        raise ValueError("lse must be contiguous")
    b, hq, sq, d = q.shape
    hkv, sk = k.size(1), k.size(2)
    with on_device(q.device):
        delta = torch.empty_like(lse)  # rowsum(o * do), written by the first kernel
        _backend.cuda_module().attention_backward(
            ptr(q), ptr(k), ptr(v), ptr(o), ptr(do), ptr(lse), ptr(doc_ids),
            ptr(dq), ptr(dk), ptr(dv), ptr(delta),
            b, hq, hkv, sq, sk, d,
            _strides(q), _strides(k), _strides(v), _strides(o), _strides(do),
            _strides(dq), _strides(dk), _strides(dv),
            float(scale), bool(causal), _kernel_window(window, sk), dtype_code(q.dtype), stream(q.device),
        )
