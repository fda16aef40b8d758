"""Resumable training checkpoints: every process's part written into a temporary folder that rank 0 renames into
place, so a process killed at any moment loses at most the steps since the last checkpoint and never corrupts one.

The folder out/checkpoints/step-000050/ holds weights.safetensors (the trainable weights), optimizer.pt, rank-<r>.pt
(each process's RNG state, and its optimizer shard under FSDP2) and state.json (step and data position).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0



def save_training_state(folder: Path, step: int, *, dist: Dist, weights: dict, optimizer, scheduler,
                        position: int, keep_last: int, sharded: bool, seconds: float = 0.0) -> None:
    """Every rank writes its part into a temporary folder; rank 0 renames it into place, then prunes old ones.

    A process killed at any moment leaves either the previous checkpoints untouched or a temporary folder that
    `latest_checkpoint` ignores. Every file, and the folders, reach the disk (fsync) before the rename that publishes
    them, so a power cut cannot leave a published checkpoint with empty files.
    """
    from safetensors.torch import save_file

    tmp = folder / f".tmp-step-{step:06d}"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    own = {"rng": rng_state(), "optimizer": optimizer.state_dict() if sharded else None}
    torch.save(own, tmp / f"rank-{dist.rank}.pt")
    fsync(tmp / f"rank-{dist.rank}.pt")
    barrier(dist)
    if dist.main:
        save_file(weights, str(tmp / "weights.safetensors"))
        torch.save({"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "position": position, "world": dist.world,
                                                        "seconds": round(seconds, 3)}))
        for name in ("weights.safetensors", "optimizer.pt", "state.json", "."):
            fsync(tmp / name)
        target = folder / f"step-{step:06d}"
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        fsync(folder)  # the rename itself
        for old in [p for p in sorted(folder.glob("step-*"))][:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dist)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (folders cannot be opened on Windows: skipped there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass
class ResumePoint:
    """A checkpoint read whole into memory, so that a damaged file shows before anything is changed."""
    folder: Path
    state: dict  # state.json: step, position, world
    weights: dict  # weights.safetensors
    saved: dict  # optimizer.pt: the optimizer (unsharded) and the scheduler
    own: dict | None  # this rank's rank-<r>.pt: RNG state (and FSDP2 optimizer shard); None when missing


def read_checkpoint(folder: Path, dist: Dist) -> ResumePoint:
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    if not isinstance(state, dict) or not {"step", "position"} <= set(state):
        raise CheckpointError(f"expected step and position in {folder / 'state.json'}, got {state!r:.80}")
    own_path = folder / f"rank-{dist.rank}.pt"
    return ResumePoint(folder, state, load_file(str(folder / "weights.safetensors")),
                       torch.load(folder / "optimizer.pt", weights_only=False),
                       torch.load(own_path, weights_only=False) if own_path.exists() else None)


def resume_point(folder: Path, dist: Dist) -> ResumePoint | None:
    """The newest checkpoint in `folder` that reads whole; a damaged one (a file cut short or garbled, by a full
    disk or a crash) is passed over with a warning for the one before it. All ranks agree on the one they use."""
    candidates = [p for p in sorted(folder.glob("step-*"), reverse=True) if (p / "state.json").is_file()]
    for path in candidates:
        try:
            point, problem = read_checkpoint(path, dist), None
        except Exception as e:  # noqa: BLE001 - torch.load and safetensors raise many kinds for a damaged file
            point, problem = None, f"{type(e).__name__}: {str(e)[:200]}"
        if dist.world > 1:  # one rank's damaged file makes every rank fall back, or they would resume apart
            import torch.distributed

            flag = torch.tensor([0 if point is None else 1], device=dist.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            point = point if flag.item() else None
            problem = problem or "another process could not read its part"
        if point is not None:
            if point.own is None:
                log.warning(f"{path} has no rank-{dist.rank}.pt (written by {point.state.get('world', '?')} "
                            f"processes, now {dist.world}): process {dist.rank} starts fresh random streams, so "
                            "the resumed run will not repeat an uninterrupted one exactly")
            return point
        log.warning(f"checkpoint {path} is damaged ({problem}); falling back to the one before it")
    if candidates:
        raise CheckpointError(f"every checkpoint in {folder} is damaged ({', '.join(p.name for p in candidates)});"
                              " remove them to start afresh, or choose another out=DIR")
    return None


def load_training_state(point: ResumePoint, *, dist: Dist, optimizer, scheduler, sharded: bool) -> None:
    """Put the optimizer, scheduler and this rank's RNG state of a checkpoint read by `resume_point` in place."""
    saved, own, folder = point.saved, point.own, point.folder
    if sharded:
        if own is None or own["optimizer"] is None:
            raise CheckpointError(f"{folder} was written by fewer FSDP2 processes; resume with the same world size")
        optimizer.load_state_dict(own["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if own is not None:
        set_rng_state(own["rng"])
    point.saved, point.own = {}, None  # the optimizer holds its own copy now


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint; half-written temporaries (a killed save) are ignored."""
    done = [p for p in sorted(folder.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed

        torch.distributed.barrier()


def rng_state() -> dict:
    """Every random stream a step may draw from: Python's, NumPy's, torch's CPU one and, on CUDA, each device's
    (dropout on the GPU draws from the latter)."""
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")  # absent from checkpoints written before the CUDA state was saved
    if cuda is None or not torch.cuda.is_available():
        return
    if len(cuda) != torch.cuda.device_count():
        log.warning(f"the checkpoint holds the CUDA random state of {len(cuda)} devices but {torch.cuda.device_count()}"
                    " are visible: CUDA random streams start afresh, so the resumed run may differ slightly")
        return
    torch.cuda.set_rng_state_all(cuda)


