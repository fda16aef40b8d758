"""The learning-rate schedule, and the wall-clock budget that can end a run before `optim.max_steps`.

A run given `optim.max_minutes` stops at whichever bound it reaches first. Its cosine follows the nearer bound too:
progress is the larger of the steps done and the time spent, each as a fraction of its bound, so a run cut short by
the clock still ends at the bottom of its cosine rather than at a high rate — the budget on a borrowed GPU, for
instance, is known in minutes, not steps.
"""

from __future__ import annotations

import math
import time

import torch

from ..config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, time_progress: float = 0.0) -> float:
    """The schedule as a fraction of each group's peak rate, for optimizer step `step` (0-based); `time_progress`
    is the fraction of `optim.max_minutes` spent (0 without a budget)."""
    if step < optim.warmup_steps:
        # The original counts from 0 (its first step runs at the start rate, spec §6.2); ours from 1, so that the
        # first step is not wasted at a rate of zero.
        done = step if optim.schedule == "original" else step + 1
        return min(1.0, optim.warmup_start + (1 - optim.warmup_start) * done / optim.warmup_steps)
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "original":  # the cosine runs over all steps, warm-up included (spec §6.2)
        progress = step / optim.max_steps
    else:
        progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
    progress = max(progress, time_progress)
    return optim.min_lr + (1 - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Budget:
    """Seconds of training spent, across resumes (a checkpoint stores them), against `optim.max_minutes`.

    Under torchrun every process must stop at the same step and use the same rate, so the main process's clock is
    the one that counts: `tick` shares it with the others (one small all-reduce a step, only when a budget is set).
    """

    def __init__(self, optim: OptimConfig, spent: float = 0.0):
        self.limit = optim.max_minutes * 60.0
        self.spent, self._since = spent, time.monotonic()
        self.progress = spent / self.limit if self.limit else 0.0

    def tick(self, dist) -> None:
        now = time.monotonic()
        self.spent, self._since = self.spent + now - self._since, now
        if not self.limit:
            return
        progress = self.spent / self.limit
        if dist.world > 1:
            import torch.distributed as torch_dist

            shared = torch.tensor([progress if dist.main else 0.0], dtype=torch.float64, device=dist.device)
            torch_dist.all_reduce(shared, op=torch_dist.ReduceOp.MAX)
            progress = float(shared)
        self.progress = progress

    @property
    def over(self) -> bool:
        return self.progress >= 1.0
