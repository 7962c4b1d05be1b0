"""Learning-rate schedules: pure functions of the step, so a resumed run needs only the step.

cosine: linear warmup from 0 to max_lr over `warmup` steps, then a half cosine down to min_lr at
        `total` steps (and min_lr after).
wsd:    warmup-stable-decay: linear warmup, max_lr held, then a linear decay to min_lr over the
        last `decay_fraction` of the steps (it lets a run be extended from a stable-phase checkpoint).
"""

from __future__ import annotations

import math
import warnings


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def wsd_decay_steps(total: int, decay_fraction: float) -> int:
    """The steps at the end of a `total`-step wsd run over which the learning rate decays (at least one)."""
    return max(1, round(total * decay_fraction))


def wsd_lr(step: int, max_lr: float, min_lr: float, warmup: int, total: int, decay_fraction: float) -> float:
    if step < warmup:
        return max_lr * (step + 1) / warmup
    decay_start = max(warmup, total - wsd_decay_steps(total, decay_fraction))
    if step < decay_start:
        return max_lr
    if step >= total:
        return min_lr
    progress = (step - decay_start) / max(1, total - decay_start)
    return max_lr + (min_lr - max_lr) * progress


def learning_rate(step: int, config) -> float:
    """The learning rate of optimizer step `step` (0-based) under a TrainConfig."""
    if config.schedule == "cosine":
        return cosine_lr(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps)
    if config.schedule == "wsd":
        return wsd_lr(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps, config.decay_fraction)
    raise ValueError(f"schedule must be 'cosine' or 'wsd', got {config.schedule!r}")


def warn_if_schedule_changed(saved_next_lr: float | None, next_lr: float, step: int) -> None:
    """On resume: warn when this run's schedule gives step `step` (0-based) another learning rate than the
    stopped run would have used (its lr, min_lr, warmup, schedule or step count changed): the run goes
    on, on the new schedule, but the warning says it no longer continues the one it started."""
    if saved_next_lr is None or math.isclose(saved_next_lr, next_lr, rel_tol=1e-9, abs_tol=1e-15):
        return
    warnings.warn(f"the learning-rate schedule changed since the checkpoint: step {step + 1} trains with lr "
                  f"{next_lr:.4g}, where the stopped run would have used {saved_next_lr:.4g} (a setting of the "
                  f"schedule differs: lr, min_lr, warmup_steps, schedule or the number of steps)", stacklevel=2)
