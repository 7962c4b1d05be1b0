"""Launch csrc/cuda/adamw.cu; llmkern/optim/adamw.py checked every tensor.

The kernels take lists of addresses that travel as kernel arguments, so nothing is uploaded
per step and a captured CUDA graph replays the launch as recorded. lr, step counts and the
clip state are device pointers (or plain numbers), so the host never waits on the GPU.
"""

from __future__ import annotations

import torch

from .. import _backend
from .._cuda_bridge import dtype_code, on_device, stream
from .._multi_tensor import group_by_dtype_and_master, group_indices


def _addresses(tensors: list, idx: list[int]) -> list[int]:
    return [tensors[i].data_ptr() for i in idx]


def grad_norm(
    grads: list[torch.Tensor],
    max_norm: float,
    grad_norm: torch.Tensor,
    clip_state: torch.Tensor,
    skipped: torch.Tensor,
    cache: dict,
) -> None:
    """The global gradient norm, the clip factor and the finite flag, on the device (see
    llmkern.ops.reference.adamw_grad_norm for the contract)."""
    mod = _backend.cuda_module()
    device = grad_norm.device
    with on_device(device):
        per_dtype = group_indices([g.dtype for g in grads])
        counts = tuple(len(idx) for idx in per_dtype.values())
        # The capacity depends on the device (its SM count) and the partials live on it: after the
        # parameters move to another GPU both are made again, or the kernels would write the old
        # device's memory (an illegal address) or need more partials than were sized.
        if cache.get("counts") != counts or cache.get("device") != device:  # the occupancy queries cost host time
            cache.pop("partials", None)
            cache["counts"], cache["device"] = counts, device
            cache["capacity"] = sum(mod.adamw_grad_sumsq_workspace(n) for n in counts)
        capacity = cache["capacity"]
        if capacity < 0:
            raise RuntimeError("adamw_grad_sumsq_workspace could not query the current CUDA device")
        # fp32 partial sums, one per block; kept so a captured graph keeps its address.
        partials = cache.get("partials")
        if partials is None or partials.numel() < capacity:
            partials = cache["partials"] = torch.empty(capacity, dtype=torch.float32, device=device)
        handle = stream(device)
        written = 0
        for dtype, idx in per_dtype.items():
            written += mod.adamw_grad_sumsq(
                _addresses(grads, idx), [grads[i].numel() for i in idx], dtype_code(dtype),
                partials.data_ptr() + 4 * written, capacity - written, handle,
            )
        mod.adamw_grad_norm_finalize(
            partials.data_ptr(), written, float(max_norm), grad_norm.data_ptr(), clip_state.data_ptr(),
            skipped.data_ptr(), handle,
        )


def step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    masters: list[torch.Tensor | None] | None,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_state: torch.Tensor | None,
    cache: dict,
) -> None:
    """One AdamW step in place (llmkern.ops.reference.adamw_step's contract), a few launches
    per (param dtype, master or not)."""
    mod = _backend.cuda_module()
    device = params[0].device
    if masters is None:
        masters = [None] * len(params)
    lr_on_device = isinstance(lr, torch.Tensor)
    with on_device(device):
        handle = stream(device)
        per_kind = group_by_dtype_and_master(params, masters)
        for (dtype, has_master), idx in per_kind.items():
            mod.adamw_step(
                _addresses(params, idx), _addresses(grads, idx), _addresses(exp_avgs, idx),
                _addresses(exp_avg_sqs, idx), _addresses(masters, idx) if has_master else [],
                _addresses(steps, idx), [params[i].numel() for i in idx], dtype_code(dtype),
                0.0 if lr_on_device else float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                lr.data_ptr() if lr_on_device else 0,
                0 if clip_state is None else clip_state.data_ptr(), handle,
            )
