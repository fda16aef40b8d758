"""Evaluation during training: a registered evaluator scores the model every `eval_every` steps, so a run shows
what it learns, not only its loss.

An evaluator is `evaluator(model, processor, *, n, seed) -> {name: score}`. The shapes world registers "world"
(accuracy per task type, on real and on grey images) from its own folder, which training may not import.
"""

from __future__ import annotations

import logging

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from ..registry import Registry
from .resume import Dist, barrier, rng_state, set_rng_state

log = logging.getLogger(__name__)

# name -> evaluator(model, processor, *, n: int, seed: int) -> dict[str, float]
EVALUATORS: Registry = Registry("evaluator", {"world": "sparkles.world.data"})

# One seed for every evaluation of every run: the same items each time, so the points of a curve compare like with
# like. The world's training streams draw from their own namespaced seeds, so these items are never trained on.
EVAL_SEED = 10_000


def check_evaluation(config: TrainConfig, *, sharded: bool) -> None:
    """Fail before the first step, on every rank, rather than hang the others at the first evaluation."""
    if config.eval_every <= 0:
        return
    if sharded:
        raise ConfigError("eval_every needs strategy=ddp (or one process): under fsdp2 rank 0 alone cannot run the "
                          "sharded model; set eval_every=0 and evaluate the saved model instead")
    EVALUATORS.get(config.evaluator)  # an unknown name is a ConfigError listing the known ones


def due(config: TrainConfig, step: int) -> bool:
    return config.eval_every > 0 and (step % config.eval_every == 0 or step == config.optim.max_steps)


def evaluate(model, processor, config: TrainConfig, step: int, dist: Dist) -> dict[str, float] | None:
    """Rank 0 scores the (unwrapped) model in eval mode; the other ranks wait at a barrier. Returns the scores on
    rank 0, None elsewhere.

    Every RNG stream is put back afterwards, so a run with evaluation trains exactly as one without, and a
    resumed run matches an uninterrupted one.
    """
    scores = None
    if dist.main:
        evaluator, state, training = EVALUATORS.get(config.evaluator), rng_state(), model.training
        model.eval()
        try:
            with torch.no_grad():
                raw = evaluator(model, processor, n=config.eval_n, seed=EVAL_SEED)
        finally:
            model.train(training)
            set_rng_state(state)
        scores = {name: float(value) for name, value in raw.items()}
        summary = ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
        log.info(f"eval at step {step} ({config.evaluator}, n={config.eval_n}): {summary}")
    barrier(dist)
    return scores
