"""Host-side grouping shared by the multi-tensor AdamW launchers (llmkern/cuda/adamw.py and
llmkern/triton/adamw.py): each launch covers the tensors of one kernel instantiation key."""

from __future__ import annotations

import torch


def group_indices(keys: list) -> dict:
    """Indices of the tensors per kernel instantiation key, keys and indices in first-seen order."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def group_by_dtype_and_master(params: list[torch.Tensor], masters: list[torch.Tensor | None]) -> dict:
    """group_indices keyed by (param dtype, has an fp32 master copy): one update launch each."""
    return group_indices([(p.dtype, masters[i] is not None) for i, p in enumerate(params)])
