"""A training step's scalars, read on the host without draining the GPU.

`loss.item()` on a CUDA tensor waits for every kernel queued so far, so reading a step's loss
as soon as the step is queued leaves the GPU idle while Python prepares the next step. A
Readback instead queues a copy into pinned host memory behind the step and marks it with an
event; read() waits for that event alone. The trainer reads step t after it has queued step
t + 1, so the GPU always has a step to run.
"""

from __future__ import annotations

import torch


class Readback:
    """0-d tensors copied to the host as float32 once the work queued before them is done."""

    def __init__(self, *values: torch.Tensor):
        stacked = torch.stack([v.detach().reshape(()).float() for v in values])
        self._done = None
        if stacked.device.type == "cuda":
            self._host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()  # on the current stream, behind the copy
        else:
            self._host = stacked.cpu()

    def read(self) -> list[float]:
        """The values as Python floats; waits for the step that made them, not for later ones."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
