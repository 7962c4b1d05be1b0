"""Launch csrc/cuda/layer_norm.cu on 2-D (rows, N) views; the op in llmkern/ops checked them."""

from __future__ import annotations

import torch

from .. import _backend
from .._cuda_bridge import dtype_code, on_device, ptr, stream


def forward(x, weight, bias, residual, eps, y, h) -> None:
    """y = layernorm(h) * weight (+ bias) with h = x (+ residual); h written only when residual is
    given. The stream's dtype is residual's (x's without one); x and y may be 16-bit beside an fp32 one."""
    rows, cols = x.shape
    with on_device(x.device):
        _backend.cuda_module().layer_norm_forward(
            ptr(x), ptr(residual), ptr(weight), ptr(bias), ptr(y), ptr(h),
            rows, cols,
            x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0),
            0 if h is None else h.stride(0),
            float(eps), dtype_code(x.dtype), dtype_code((x if residual is None else residual).dtype),
            dtype_code(y.dtype), dtype_code(weight.dtype), stream(x.device),
        )


def backward(dy, h, weight, dh_extra, eps, dh, dweight, dbias) -> None:
    """dh = d(layernorm(h) * weight)/dh . dy (+ dh_extra); dweight and dbias (unless None) summed over
    rows in fp32. dy may be 16-bit beside an fp32 h; dh_extra and dh have h's dtype."""
    rows, cols = h.shape
    mod = _backend.cuda_module()
    with on_device(h.device):
        # fp32 partial sums of dweight (and dbias), one row each per block; the allocator owns the memory.
        workspace = torch.empty(
            mod.layer_norm_backward_workspace(rows, cols, dbias is not None), dtype=torch.float32, device=h.device
        )
        mod.layer_norm_backward(
            ptr(dy), ptr(h), ptr(weight), ptr(dh_extra), ptr(dh), ptr(dweight), ptr(dbias), ptr(workspace),
            workspace.numel(), rows, cols,
            dy.stride(0), h.stride(0), 0 if dh_extra is None else dh_extra.stride(0), dh.stride(0),
            float(eps), dtype_code(dy.dtype), dtype_code(h.dtype), dtype_code(weight.dtype), stream(h.device),
        )
