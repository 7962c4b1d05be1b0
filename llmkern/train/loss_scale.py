"""Dynamic loss scaling for float16 autocast: the loss is multiplied by `scale` before the backward,
so that small gradients survive float16's narrow range, and the gradients divided by it again before
the optimizer sees them.

A step whose gradient norm is not finite overflowed: it is skipped and the scale halved. After
`growth_interval` clean steps in a row the scale doubles. These are torch.amp.GradScaler's rules;
llmkern keeps its own few lines because the decision must be the same on every rank. The training
loops unscale the gradients (an inf stays one) and make it from the global gradient norm, which they
compute for clipping anyway and which is reduced over the ranks even when FSDP2 shards the gradients
(GradScaler decides from each rank's own shard, so ranks could disagree on whether to step).
"""

from __future__ import annotations

import math

import torch

MIN_SCALE = 1.0  # below it, an overflow is not the scale's doing: the step counts as diverged


class DynamicLossScale:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not (math.isfinite(init_scale) and init_scale >= MIN_SCALE):
            raise ValueError(f"init_scale must be a finite number >= {MIN_SCALE}, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0  # finite steps since the last change of scale

    def can_back_off(self) -> bool:
        """Whether an overflow now can be blamed on the scale (it is still above MIN_SCALE)."""
        return self.scale > MIN_SCALE

    def update(self, overflowed: bool) -> None:
        """After each step: halve on an overflow (not below MIN_SCALE), double after growth_interval clean steps."""
        if overflowed:
            self.scale = max(MIN_SCALE, self.scale * self.backoff_factor)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


@torch.no_grad()
def unscale_(params, scale: float) -> None:
    """Divide the gradients of params by scale (an inf or NaN stays one, for the skip that follows)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / scale)
