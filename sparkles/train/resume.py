"""Resumable training checkpoints: every process's part written into a temporary folder that rank 0 renames into
place, so a process killed at any moment loses at most the steps since the last checkpoint and never corrupts one.

The folder out/checkpoints/step-000050/ holds weights.safetensors (the trainable weights), optimizer.pt, rank-<r>.pt
(each process's RNG state, and its optimizer shard under FSDP2) and state.json (step and data position).
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
                        position: int, keep_last: int, sharded: bool) -> None:
    """Every rank writes its part into a temporary folder; rank 0 renames it into place, then prunes old ones.

    A process killed at any moment leaves either the previous checkpoints untouched or a temporary folder that
    `latest_checkpoint` ignores.
    """
    from safetensors.torch import save_file

    tmp = folder / f".tmp-step-{step:06d}"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    own = {"rng": rng_state(), "optimizer": optimizer.state_dict() if sharded else None}
    torch.save(own, tmp / f"rank-{dist.rank}.pt")
    barrier(dist)
    if dist.main:
        save_file(weights, str(tmp / "weights.safetensors"))
        torch.save({"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "position": position, "world": dist.world}))
        target = folder / f"step-{step:06d}"
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in [p for p in sorted(folder.glob("step-*"))][:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dist)


def load_training_state(folder: Path, *, dist: Dist, optimizer, scheduler, sharded: bool) -> None:
    saved = torch.load(folder / "optimizer.pt", weights_only=False)
    own_path = folder / f"rank-{dist.rank}.pt"
    own = torch.load(own_path, weights_only=False) if own_path.exists() else None
    if sharded:
        if own is None or own["optimizer"] is None:
            raise CheckpointError(f"{folder} was written by fewer FSDP2 processes; resume with the same world size")
        optimizer.load_state_dict(own["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if own is not None:
        set_rng_state(own["rng"])


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


