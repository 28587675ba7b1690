"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``, stepped once per optimizer step.

They are small callable classes (not lambdas) so that ``LambdaLR.state_dict()`` saves their settings and a
resumed run continues the same schedule.
"""
from __future__ import annotations

import math

__all__ = ["LinearWarmup", "WarmupCosine"]


class LinearWarmup:
    """Multiplier ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` optimizer steps, then 1.

    ``warmup_steps=0`` means a constant learning rate.
    """

    def __init__(self, warmup_steps: int = 0):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return 1.0


class WarmupCosine(LinearWarmup):
    """Linear warm-up, then a cosine decay from 1 to ``final`` at ``total_steps`` (held there afterwards)."""

    def __init__(self, warmup_steps: int = 0, total_steps: int = 100_000, final: float = 0.0):
        super().__init__(warmup_steps)
        if not isinstance(total_steps, int) or total_steps <= warmup_steps:
            raise ValueError(f"total_steps={total_steps!r} must be an int larger than warmup_steps={warmup_steps}")
        if not 0.0 <= final <= 1.0:
            raise ValueError(f"final={final!r} is a fraction of the base learning rate; use a value in [0, 1]")
        self.total_steps, self.final = total_steps, final

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return super().__call__(step)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))
