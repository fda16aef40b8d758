"""Training that does not fail silently: a step whose loss or gradient norm is NaN/inf is skipped on every process
at once, `max_nonfinite` of them in a row stop the run, and weights holding NaN/inf are never written.

A skipped step still counts: the step counter, the learning-rate schedule and the data position advance as if the
step had run, so its batch is lost rather than retried. A run whose every batch diverges then cannot loop forever,
and a resumed run stays aligned with the schedule that `lr_factor(step)` gives.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import TrainingDiverged
from .resume import Dist

log = logging.getLogger(__name__)


def any_across(flag: bool, dist: Dist) -> bool:
    """True when `flag` holds on any process: one all-reduce, so that every rank takes the same branch."""
    if dist.world == 1:
        return flag
    import torch.distributed

    t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    torch.distributed.all_reduce(t)
    return float(t) > 0


def mean_and_finite(loss: float, checked, dist: Dist) -> tuple[float, bool]:
    """The loss averaged over processes, and whether it and every value in `checked` are finite on every process:
    one all-reduce carries both, so that all ranks skip together at no extra cost."""
    bad = not all(math.isfinite(float(v)) for v in (loss, *checked))
    if dist.world == 1:
        return loss, not bad
    import torch.distributed

    t = torch.tensor([0.0 if bad else loss, 1.0 if bad else 0.0], device=dist.device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return (float("nan"), False) if t[1] > 0 else (float(t[0]) / dist.world, True)


def origins_everywhere(origins: list[str], dist: Dist) -> list[str]:
    """Every process's sample origins, for the log line of a skipped step (only rank 0 logs; rare, so cheap)."""
    if dist.world == 1:
        return origins
    import torch.distributed

    gathered: list = [None] * dist.world
    torch.distributed.all_gather_object(gathered, origins)
    return [origin for part in gathered for origin in part]


class NonFiniteGuard:
    """Counts skipped steps: `pending` since the last metrics row, `streak` in a row (0 disables the stop)."""

    def __init__(self, limit: int):
        self.limit, self.streak, self.pending, self.batch = limit, 0, 0, ""

    def record(self, finite: bool, step: int, origins: list[str], dist: Dist) -> None:
        """Note step `step` (1-based), naming the samples of a skipped one (every rank must call this)."""
        if finite:
            self.streak = 0
            return
        self.streak, self.pending = self.streak + 1, self.pending + 1
        self.batch = ", ".join(origins_everywhere(origins, dist)) or "no samples (all skipped)"
        log.warning(f"step {step}: non-finite loss or gradient norm; optimizer step skipped. Batch: {self.batch}")

    def check(self, step: int) -> None:
        """Raise `TrainingDiverged` once `limit` steps in a row were skipped; called after the step's metrics row."""
        if self.limit and self.streak >= self.limit:
            raise TrainingDiverged(
                f"training diverged at step {step}: {self.streak} steps in a row (max_nonfinite={self.limit}) had a "
                f"NaN/inf loss or gradient norm; the last batch held {self.batch}. Expected finite values: lower the "
                "learning rate, turn clipping on (optim.clip), or train in bf16 rather than fp16")

    def take(self) -> int:
        """Skipped steps since the last call: a metrics row's `nonfinite`, so the column sums to the run's total."""
        n, self.pending = self.pending, 0
        return n


def check_weights(weights: dict[str, torch.Tensor], dist: Dist, what: str) -> None:
    """Refuse to write weights holding NaN/inf; every rank raises together (under FSDP2 only rank 0 holds them)."""
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if any_across(bool(bad), dist):
        where = f"{len(bad)} tensors: {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}" if bad else "another process"
        raise TrainingDiverged(f"refusing to save {what}: expected finite weights, found NaN/inf in {where}")
