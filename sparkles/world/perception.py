"""Perception before reasoning: pretrain a vision tower on what the shapes world knows of every scene.

Real VLMs start from a tower that already sees. Ours is trained from scratch, so this stage gives it the world's
free labels: for each patch, the object whose centre lies in it (shape, colour and size as one class, or none), and
the scene's background from the pooled tokens. Objects never share a patch (they are at least 0.21 of the side
apart, a patch is 1/8), so one class per patch loses nothing. The probe is thrown away afterwards; what stays is
a tower whose tokens name the objects, which the LM then only has to learn to read.

`train_perception` is resumable like the main loop: a killed run continues from its last state file.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import VisionConfig
from ..errors import ConfigError
from ..processor import image_to_tensor
from ..train.stages import STAGE_KINDS
from .shapes import BACKGROUNDS, COLORS, SIZES, Scene, SceneConfig, render, sample_scene

log = logging.getLogger(__name__)
STATE, TOWER = "perception_state.pt", "tower.safetensors"


def classes(config: SceneConfig = SceneConfig()) -> list[tuple[str, str, str]]:
    """The object classes a patch can hold, after class 0 = no object centred here."""
    return [(shape, color, size) for shape in config.shapes for color in COLORS for size in SIZES]


def patch_labels(scene: Scene, grid: int, config: SceneConfig = SceneConfig()) -> list[int]:
    """One class per patch of a `grid`×`grid` tower, row by row: 0, or 1 + the index of the centred object."""
    index = {c: i + 1 for i, c in enumerate(classes(config))}
    labels = [0] * (grid * grid)
    for obj in scene.objects:
        row, col = min(int(obj.y * grid), grid - 1), min(int(obj.x * grid), grid - 1)
        labels[row * grid + col] = index[(obj.shape, obj.color, obj.size)]
    return labels


class Probe(nn.Module):
    """Linear read-outs of the tower's tokens: per patch the object class, pooled the background."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.objects = nn.Linear(width, num_classes)
        self.background = nn.Linear(width, len(BACKGROUNDS))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objects(features), self.background(features.mean(1))  # (N, P, classes), (N, 4)


@dataclass(frozen=True)
class PerceptionConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_every: int = 250
    eval_n: int = 256
    seed: int = 0
    save_every: int = 250


def batch(seed: int, step: int, size: int, vision: VisionConfig, grid: int, scene_config=SceneConfig()):
    """Pixels and labels of `size` fresh scenes; the same (seed, step) always gives the same batch."""
    rng = random.Random(f"perception/{seed}/{step}")
    scenes = [sample_scene(rng, scene_config) for _ in range(size)]
    pixels = torch.stack([image_to_tensor(render(s, vision.image_size), vision) for s in scenes])
    objects = torch.tensor([patch_labels(s, grid, scene_config) for s in scenes])
    background = torch.tensor([BACKGROUNDS.index(s.background.kind) for s in scenes])
    return pixels, objects, background


def grid_of(tower) -> int:
    grid = math.isqrt(tower.num_tokens)
    if grid * grid != tower.num_tokens:
        raise ConfigError(f"perception pretraining needs a square grid of tower tokens, got {tower.num_tokens}")
    return grid


@torch.no_grad()
def evaluate(tower, probe, vision: VisionConfig, *, n: int = 256, seed: int = 10_001) -> dict[str, float]:
    """Patch accuracy, object recall (centred objects named right) and scenes read entirely right."""
    tower.eval()
    pixels, objects, background = batch(seed, 0, n, vision, grid_of(tower))
    logits, bg = probe(tower(pixels))
    guess = logits.argmax(-1)
    has = objects > 0
    exact = ((guess == objects).all(1) & (bg.argmax(-1) == background)).float().mean()
    tower.train()
    return {"patch_accuracy": float((guess == objects).float().mean()),
            "object_recall": float((guess[has] == objects[has]).float().mean()),
            "background": float((bg.argmax(-1) == background).float().mean()), "scene_exact": float(exact)}


def train_perception(tower, vision: VisionConfig, out: str | Path, config: PerceptionConfig = PerceptionConfig(),
                     *, progress: bool = True) -> dict[str, float]:
    """Train `tower` in place with a throw-away probe; write `out/tower.safetensors` and `out/metrics.jsonl`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = grid_of(tower)
    probe = Probe(tower.out_dim, 1 + len(classes()))
    params = [*tower.parameters(), *probe.parameters()]
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / config.warmup_steps) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))))
    start = _resume(out / STATE, tower, probe, optim, sched)
    _drop_rows_after(out / "metrics.jsonl", start)  # a killed run wrote rows past its last saved state
    # Most patches hold no object centre: unweighted, "none everywhere" is a deep local minimum (measured: object
    # recall 0.02 after 300 steps), so the empty class counts a tenth.
    weight = torch.ones(1 + len(classes()))
    weight[0] = 0.1
    object_loss, background_loss, metrics = nn.CrossEntropyLoss(weight=weight), nn.CrossEntropyLoss(), {}
    bar = _bar(config.steps, start, progress)
    tower.train()
    with (out / "metrics.jsonl").open("a") as log_file:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            pixels, objects, background = batch(config.seed, step, config.batch_size, vision, grid)
            logits, bg = probe(tower(pixels))
            loss = object_loss(logits.flatten(0, 1), objects.flatten()) + background_loss(bg, background)
            if not torch.isfinite(loss):
                raise ConfigError(f"perception step {step}: the loss is {float(loss)}; lower the learning rate")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            row = {"step": step + 1, "loss": round(loss.item(), 5), "seconds": round(time.perf_counter() - t0, 3)}
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                metrics = evaluate(tower, probe, vision, n=config.eval_n)
                row["eval"] = metrics
                log.info("perception step %d: loss %.4f, %s", step + 1, loss.item(), metrics)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            if (step + 1) % config.save_every == 0:
                _save_state(out / STATE, step + 1, tower, probe, optim, sched)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(out / TOWER))
    _save_state(out / STATE, config.steps, tower, probe, optim, sched)
    return metrics or evaluate(tower, probe, vision, n=config.eval_n)


def _bar(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="perception", unit="step")


def _save_state(path: Path, step: int, tower, probe, optim, sched) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "tower": tower.state_dict(), "probe": probe.state_dict(),
                "optim": optim.state_dict(), "sched": sched.state_dict()}, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous state whole


def _resume(path: Path, tower, probe, optim, sched) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False)
    tower.load_state_dict(state["tower"])
    probe.load_state_dict(state["probe"])
    optim.load_state_dict(state["optim"])
    sched.load_state_dict(state["sched"])
    log.info("perception: resumed at step %d from %s", state["step"], path)
    return state["step"]


def run_stage(config, *, resume: bool = False) -> Path:
    """The "perception" stage of a staged recipe: pretrain the tower of `config.model` (or of `config.init`) and
    write the whole model, its other parts as they were, to ``out/model`` for the next stage to start from.

    Read from the TrainConfig: optim.max_steps, batch_size, lr_vision, warmup_steps; eval_every, save_every, seed.
    """
    from ..model.checkpoint import load_checkpoint, save_checkpoint
    from ..model.model import build_model

    out = Path(config.out)
    if (out / STATE).is_file() and not resume:
        raise ConfigError(f"{out} already holds a perception run; pass --resume to continue it, or choose another "
                          "out=DIR")
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model, processor = load_checkpoint(config.init) if config.init else build_model(config.model)
    optim = config.optim
    settings = PerceptionConfig(steps=optim.max_steps, batch_size=optim.batch_size, lr=optim.lr_vision or 1e-3,
                                warmup_steps=max(1, optim.warmup_steps), eval_every=config.eval_every or 250,
                                seed=config.seed, save_every=config.save_every)
    metrics = train_perception(model.vision, model.config.vision, out, settings)
    (out / "perception.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("perception: %s", metrics)
    return save_checkpoint(model, processor, out / "model")


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # half a line from a kill
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


STAGE_KINDS.register("perception", run_stage)  # what `Stage(kind="perception")` in a recipe runs
