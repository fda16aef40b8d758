"""Staged recipes: a preset (or config file) may list stages, which `sparkles train` runs in order, as LLaVA and
SparklesChat train in two stages.

Stage k runs in ``out/<k>-<name>/`` with the recipe's config plus its own overrides and then the command line's,
starting from stage k-1's model. A stage whose model folder exists is done and is skipped, so a killed staged run
resumes with ``--resume``: finished stages stay finished and the interrupted one continues from its checkpoint.
The last stage's model is the recipe's model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import Stage, TrainConfig
from ..registry import Registry

log = logging.getLogger(__name__)

# kind -> runner(config, *, resume) -> the stage's model folder. "vlm" is the training loop; the shapes world
# registers "perception" (tower pretraining on its object labels) from its own folder.
STAGE_KINDS: Registry = Registry("stage kind", {"perception": "sparkles.world.perception"})


def _vlm(config: TrainConfig, *, resume: bool) -> Path:
    from .loop import train

    return train(config, resume=resume)


STAGE_KINDS.register("vlm", _vlm)


def plan(config: TrainConfig, overrides: Sequence[str],
         apply: Callable[[TrainConfig, list[tuple[str, str]]], TrainConfig]) -> list[tuple[Stage, TrainConfig]]:
    """Each stage's own config: the recipe without its stages, the stage's overrides, then `overrides`."""
    base = dataclasses.replace(config, stages=())
    planned, previous = [], config.init
    for k, stage in enumerate(config.stages, start=1):
        stage_config = apply(base, [_pair(item) for item in (*stage.overrides, *overrides)])
        if stage_config.init == base.init:  # unless the stage names its own, start where the last one ended
            stage_config = dataclasses.replace(stage_config, init=previous)
        stage_config = dataclasses.replace(stage_config, out=str(Path(config.out) / f"{k}-{stage.name}"))
        planned.append((stage, stage_config))
        previous = str(Path(stage_config.out) / "model")
    return planned


def run_stages(config: TrainConfig, overrides: Sequence[str], apply, *, resume: bool = False) -> Path:
    """Run every stage not yet done; returns the last stage's model folder."""
    final = None
    planned = plan(config, overrides, apply)
    for k, (stage, stage_config) in enumerate(planned, start=1):
        final = Path(stage_config.out) / "model"
        if (final / "config.json").is_file():
            log.info(f"stage {k}/{len(planned)} {stage.name}: done already ({final})")
            continue
        log.info(f"stage {k}/{len(planned)} {stage.name} ({stage.kind}): {stage_config.optim.max_steps} steps "
                 f"into {stage_config.out}")
        final = STAGE_KINDS.get(stage.kind)(stage_config, resume=resume)
    return final


def _pair(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key.strip(), value.strip()
