"""Weight mixing (SPHINX §2.4): θ = Σ wᵢ·θᵢ over checkpoints of one architecture, part by part.

SPHINX trains one model on real-world data and one on synthetic captions, then interpolates their weights linearly.
`merge_checkpoints` does that for any number of Sparkles checkpoints: the parts named are mixed, every other part is
taken from the first checkpoint whole. Mixing needs the same architecture (configs equal in everything but the
trainable flags) and the same stored tensors (names and shapes); anything else is refused before a weight is read.

Weights must sum to 1, so that the mix is an interpolation: a sum of 0.9 scales every weight matrix by 0.9, which is
rarely meant. `allow_any_sum=True` (`--allow-any-sum`) permits it on purpose (extrapolation, task arithmetic).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..config import to_dict
from ..errors import CheckpointError, ConfigError
from .checkpoint import load_checkpoint, read_config, save_checkpoint
from .model import VisionLanguageModel

SUM_TOLERANCE = 1e-6  # weights such as 1/3, 1/3, 1/3 typed as decimals still count as summing to 1
SHOWN = 5  # differences named in an error; the rest are counted


def merge_checkpoints(folders: list[str | os.PathLike], out: str | os.PathLike, weights: list[float] | None = None,
                      *, parts: tuple[str, ...] | None = None, allow_any_sum: bool = False) -> Path:
    """Mix the checkpoints in `folders` with `weights` (default: equal) into the full checkpoint folder `out`.

    `parts` (default: all of vision, connector, lm) are mixed; the others come from the first checkpoint. The
    result keeps the first checkpoint's config (trainable flags included) and tokenizer, and is saved atomically."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ConfigError(f"merging needs at least 2 checkpoints, got {len(folders)}")
    weights = check_weights(weights, len(folders), allow_any_sum=allow_any_sum)
    parts = check_parts(parts)
    check_same_architecture(folders)
    check_same_tensors(folders)
    model, processor = load_checkpoint(folders[0])
    state = model.state_dict()  # shares storage with the parameters: writing into it writes the model
    mixed = {k: _wide(v) * weights[0] for k, v in state.items() if _mixes(k, v, parts)}
    for folder, weight in zip(folders[1:], weights[1:]):
        other = load_checkpoint(folder)[0].state_dict()  # one other model in memory at a time
        for key, acc in mixed.items():
            acc.add_(_wide(other[key]), alpha=weight)
        del other
    with torch.no_grad():
        for key, value in mixed.items():
            state[key].copy_(value.to(state[key].dtype))
    return save_checkpoint(model, processor, out)


def check_weights(weights: list[float] | None, count: int, *, allow_any_sum: bool = False) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"{count} checkpoints need {count} weights, got {len(weights)}: {weights}")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    total = sum(weights)
    if not allow_any_sum and abs(total - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"weights must sum to 1 (an interpolation), got {weights} summing to {total:g}; pass "
                          "--allow-any-sum (allow_any_sum=True) to extrapolate on purpose")
    return weights


def check_parts(parts: tuple[str, ...] | None) -> tuple[str, ...]:
    known = VisionLanguageModel.PARTS
    if parts is None:
        return known
    unknown = [p for p in parts if p not in known]
    if unknown or not parts:
        raise ConfigError(f"unknown parts {unknown} to mix; parts: {list(known)}" if unknown
                          else f"no parts to mix; parts: {list(known)}")
    return tuple(parts)


def check_same_architecture(folders: list[Path]) -> None:
    """Configs must be equal in everything but `trainable`, which says what learned, not what the model is."""
    first = _architecture(folders[0])
    for folder in folders[1:]:
        differ = _differences(first, _architecture(folder))
        if differ:
            shown = "; ".join(f"{key}: {a!r} vs {b!r}" for key, a, b in differ[:SHOWN])
            more = f" (and {len(differ) - SHOWN} more)" if len(differ) > SHOWN else ""
            raise CheckpointError(f"{folders[0]} and {folder} are different architectures and cannot be mixed: "
                                  f"{shown}{more}")


def check_same_tensors(folders: list[Path]) -> None:
    """The stored weights must have the same names and shapes (read from the file headers, no tensor loaded)."""
    first = _stored(folders[0])
    for folder in folders[1:]:
        other = _stored(folder)
        only_a, only_b = sorted(set(first) - set(other)), sorted(set(other) - set(first))
        if only_a or only_b:
            raise CheckpointError(
                f"{folders[0]} and {folder} store different weights: {len(only_a)} only in the first "
                f"(e.g. {only_a[:SHOWN]}), {len(only_b)} only in the second (e.g. {only_b[:SHOWN]}); save both "
                "the same way (all weights, or trainable only)")
        shapes = [f"{k}: {first[k]} vs {other[k]}" for k in sorted(first) if first[k] != other[k]]
        if shapes:
            raise CheckpointError(f"{folders[0]} and {folder} store weights of different shapes ({len(shapes)}), "
                                  f"e.g. {'; '.join(shapes[:SHOWN])}")


def _architecture(folder: Path) -> dict:
    config, _ = read_config(folder)
    described = to_dict(config)
    described.pop("trainable")
    return described


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """Dotted keys where two plain-data configs differ, depth first, in key order."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            found += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return found
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def _stored(folder: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def _mixes(key: str, value: torch.Tensor, parts: tuple[str, ...]) -> bool:
    # Integer buffers (positions, counters) are not weights: they come from the first checkpoint.
    return key.split(".", 1)[0] in parts and value.is_floating_point()


def _wide(value: torch.Tensor) -> torch.Tensor:
    """An fp32 (or wider) copy, so that mixing fp16/bf16 weights does not round at every step."""
    return value.detach().to(torch.promote_types(value.dtype, torch.float32), copy=True)


def add_cli(commands) -> None:
    parser = commands.add_parser("merge", help="mix the weights of checkpoints of one architecture (SPHINX)")
    parser.add_argument("out", help="the checkpoint folder to write")
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="two or more checkpoint folders")
    parser.add_argument("--weights", default=None, help="comma-separated, one per checkpoint, summing to 1 "
                        "(default: equal)")
    parser.add_argument("--parts", default=None, help="comma-separated parts to mix: vision, connector, lm "
                        "(default: all); the others are taken from the first checkpoint")
    parser.add_argument("--allow-any-sum", action="store_true", help="allow weights that do not sum to 1")
    parser.set_defaults(run=_run_merge)


def _run_merge(args) -> int:
    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",") if w.strip()]
        except ValueError:
            raise ConfigError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip()) if args.parts is not None else None
    out = merge_checkpoints(args.checkpoints, args.out, weights, parts=parts, allow_any_sum=args.allow_any_sum)
    shown = ", ".join(f"{w:g}×{c}" for w, c in zip(check_weights(weights, len(args.checkpoints),
                                                                    allow_any_sum=True), args.checkpoints))
    kept = [p for p in VisionLanguageModel.PARTS if p not in (parts or VisionLanguageModel.PARTS)]
    rest = f"; {', '.join(kept)} from {args.checkpoints[0]}" if kept else ""
    print(f"wrote {out}: {', '.join(parts or VisionLanguageModel.PARTS)} = {shown}{rest}")
    return 0
