"""LR schedules as pure functions of the optimizer step; torch's LambdaLR multiplies the peak lr by them.

`step` counts optimizer steps already taken (0 for the first), so the LR used by optimizer step k is
lr * lr_multiplier(k). The scheduler steps once per optimizer step, never per micro-batch (EveryDream2 D14).
Formulas, with w = warmup steps, D = decay steps and p = clamp((step - w) / (D - w), 0, 1):
    warmup (step < w)           (step + 1) / (w + 1)       never 0, so the first step is not wasted
    constant, constant_with_warmup   1
    linear                      1 - p
    cosine                      (1 + cos(pi p)) / 2
    cosine_with_restarts        (1 + cos((2n - 1) pi p)) / 2        n cycles; the LR rises back smoothly
    cosine_with_hard_restarts   (1 + cos(pi frac(n p))) / 2         n cycles; the LR jumps back to peak
    polynomial                  (1 - p) ^ power
    rex                         (1 - p) / ((1 - d) + d (1 - p)), d = 0.9
Decaying schedules are then mapped to min_factor + (1 - min_factor) * value. p is clamped, so after D the
LR stays at its end value instead of rising again (diffusers' cosine climbs back after D).
"""
from __future__ import annotations

import math

# REX (arXiv 2107.04197) with OneTrainer's constant, so curves match what OneTrainer users know; a smaller d
# bends the curve less.
REX_D = 0.9
# EveryDream2's automatic warmup: lr_decay_steps / 50.
AUTO_WARMUP_FRACTION = 0.02
NO_DECAY = ("constant", "constant_with_warmup")
# Schedules whose automatic warmup is 0: diffusers' constant ignores warmup (as in EveryDream2), and REX is
# meant to start at its peak (OneTrainer's advice).
NO_AUTO_WARMUP = ("constant", "rex")


def warmup_factor(step: int, warmup_steps: int) -> float:
    return (step + 1) / (warmup_steps + 1)


def decay_progress(step: int, warmup_steps: int, decay_steps: int) -> float:
    """How far through the decay phase `step` is, 0..1 (clamped at both ends)."""
    p = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min(1.0, max(0.0, p))


def decay_value(schedule: str, p: float, *, num_cycles: float, power: float) -> float:
    """The schedule's curve at progress p, from 1 (peak) down to 0."""
    if schedule in NO_DECAY:
        return 1.0
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "cosine_with_restarts":
        return 0.5 * (1.0 + math.cos(math.pi * (2.0 * num_cycles - 1.0) * p))
    if schedule == "cosine_with_hard_restarts":
        return 0.0 if p >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0)))
    if schedule == "polynomial":
        return (1.0 - p) ** power
    if schedule == "rex":
        return (1.0 - p) / ((1.0 - REX_D) + REX_D * (1.0 - p))
    raise ValueError(f"unknown LR schedule '{schedule}'")


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, decay_steps: int, num_cycles: float = 3.0,
                  power: float = 1.0, min_factor: float = 0.0) -> float:
    """Factor on the peak lr for the optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    if schedule in NO_DECAY:
        return 1.0
    value = decay_value(schedule, decay_progress(step, warmup_steps, decay_steps), num_cycles=num_cycles,
                        power=power)
    return min_factor + (1.0 - min_factor) * value


def resolve_schedule_steps(schedule: str, warmup_steps: int | None, decay_steps: int | None,
                           total_steps: int) -> tuple[int, int]:
    """(warmup, decay) with the automatic values for nulls: decay = the run's total optimizer steps, so decaying
    schedules end exactly at the last step; warmup = 2% of decay, or 0 for constant and rex."""
    decay = total_steps if decay_steps is None else decay_steps
    if warmup_steps is None:
        warmup_steps = 0 if schedule in NO_AUTO_WARMUP else int(decay * AUTO_WARMUP_FRACTION)
    return warmup_steps, decay
