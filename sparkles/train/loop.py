"""Instruction tuning: parameter groups (lr 0 = frozen), the learning-rate schedule, resumable checkpoints and
one readable training loop that runs alone or under torchrun (DDP or FSDP2).

Data lives in `records.py` / `data.py`, the model in `model.py`, the NaN/inf guard in `guard.py`, evaluation during
training in `evaluators.py`. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import OptimConfig, TrainConfig, to_dict
from ..errors import CheckpointError, ConfigError
from .evaluators import check_evaluation, due, evaluate
from .guard import NonFiniteGuard, check_weights, mean_and_finite
from .resume import Dist, barrier, latest_checkpoint, load_training_state, resume_point, save_training_state
from .schedule import Budget, lr_factor

log = logging.getLogger(__name__)
PART_LR = {"vision": "lr_vision", "connector": "lr_connector", "lm": "lr_lm"}


def param_groups(model, optim: OptimConfig) -> list[dict]:
    """One group per trained part, split into decayed (matrices) and undecayed (biases, norms, 1-D) parameters."""
    groups = []
    for part in model.PARTS:
        lr = getattr(optim, PART_LR[part])
        params = [(n, p) for n, p in getattr(model, part).named_parameters() if p.requires_grad]
        if lr <= 0 or not params:
            continue
        decay = [p for n, p in params if p.dim() >= 2 and "norm" not in n]
        plain = [p for n, p in params if not (p.dim() >= 2 and "norm" not in n)]
        groups += [{"params": decay, "lr": lr, "weight_decay": optim.weight_decay, "part": part},
                   {"params": plain, "lr": lr, "weight_decay": 0.0, "part": part}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("nothing to train: every part has learning rate 0 (set optim.lr_connector, lr_lm, …)")
    return groups


def trained_parts(optim: OptimConfig) -> tuple[str, ...]:
    return tuple(part for part, key in PART_LR.items() if getattr(optim, key) > 0)


# Distributed set-up


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without it this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():  # a staged recipe trains stage after stage in one process group
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # Left to the interpreter's teardown, the group's threads could abort a rank after its work was done.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return Dist(dist.get_rank(), world, device)


def wrap_model(model, strategy: str, dist: Dist):
    """DDP replicates the model; FSDP2 shards each LM block and then the rest. One process: unchanged."""
    if dist.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # A text-only batch leaves the connector (and a trainable tower) without gradients; DDP must notice, or
        # the bucket holding them is never all-reduced and ranks silently drift apart.
        return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                       find_unused_parameters=True)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model.lm, "model", model.lm), "layers", [])
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ConfigError(f"unknown strategy {strategy!r}; expected ddp or fsdp2")


def unwrap(model):
    return getattr(model, "module", model)


def full_state(model, dist: Dist, names: set[str] | None) -> dict[str, torch.Tensor]:
    """The (trainable) weights as plain CPU tensors; FSDP2 gathers its shards first (every rank must call this)."""
    if dist.world > 1 and not hasattr(model, "module"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = unwrap(model).state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if names is None or k in names}


def describe(config: TrainConfig) -> str:
    return json.dumps(to_dict(config), indent=2, default=str)


# Building the pieces


def build_model_for(config: TrainConfig, dist: Dist):
    """The model to train, from a config or an init checkpoint; its trainable parts follow the learning rates."""
    from ..model.checkpoint import load_checkpoint
    from ..model.model import build_model

    parts = trained_parts(config.optim)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
        if config.init:
            model, processor = load_checkpoint(config.init)
            processor = _recipe_text(config, model, processor)
        else:
            model, processor = build_model(config.model)
    model.config = dataclasses.replace(model.config, trainable=parts)
    model.set_trainable(parts)
    if config.activation_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(dist.device), processor


def _recipe_text(config: TrainConfig, model, processor):
    """A recipe that names its model sets the training text, not its init checkpoint: the paper's recipe trains
    without the system prompt an imported SparklesChat-7B chats with (spec §4.2). No model named: the checkpoint's."""
    wanted = {"system_prompt": config.model.system_prompt, "template": config.model.template}
    if config.model == TrainConfig().model or all(getattr(model.config, k) == v for k, v in wanted.items()):
        return processor
    model.config = dataclasses.replace(model.config, **wanted)
    return type(processor)(processor.tokenizer, model.config)


def make_loader(config: TrainConfig, processor, dist: Dist, *, start: int):
    """A DataLoader over the blend of every source, starting `start` global batches in."""
    from functools import partial

    from .data import BlendSampler, LengthEstimate, TrainDataset, collate, collate_packed
    from .records import read_source

    if not config.data.sources:
        raise ConfigError("no training data: give data=PATH (a SparklesDialogue JSON, LLaVA JSON or our JSONL)")
    sources, reports = zip(*(read_source(s, strict=config.data.strict, seed=config.seed,
                                         max_images=processor.config.max_images) for s in config.data.sources))
    if dist.main:
        for report in reports:
            (log.warning if report.skipped else log.info)(report.summary())
    dataset = TrainDataset(sources, processor, max_len=config.data.max_len)
    lengths = LengthEstimate(sources, processor, max_len=config.data.max_len) if config.data.group_by_length else None
    sampler = BlendSampler([len(s) for s in sources], [s.ratio for s in config.data.sources],
                           batch_size=config.optim.batch_size, seed=config.seed, rank=dist.rank,
                           world_size=dist.world, lengths=lengths, start=start)
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    collate_fn = (partial(collate_packed, pad_id=pad, max_len=config.data.max_len) if config.data.pack
                  else partial(collate, pad_id=pad))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                       num_workers=config.data.num_workers, persistent_workers=False)


class Metrics:
    """metrics.jsonl (append-only, so a resumed run continues it) plus TensorBoard when it is installed."""

    def __init__(self, out: Path, enabled: bool, *, after: int | None = None):
        self.enabled, self.file, self.board = enabled, None, None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        if after is not None and path.exists():
            # Steps logged after the checkpoint we resume from will run again: drop them, keep no duplicates.
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after]
            path.write_text("".join(row + "\n" for row in rows))
        elif path.exists():
            path.unlink()  # a fresh run starts a fresh log
        self.file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board:
            for key, value in row.items():
                for name, scalar in (value.items() if isinstance(value, dict) else [("", value)]):
                    if key != "step" and isinstance(scalar, (int, float)):  # {"eval": {"x": 1}} -> eval/x
                        self.board.add_scalar(f"{key}/{name}" if name else key, scalar, row["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()


# The loop


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train until `optim.max_steps`, checkpointing every `save_every` steps; returns the final model folder."""
    from tqdm.auto import tqdm

    from ..model.checkpoint import save_checkpoint

    dist = init_distributed()
    out, optim = Path(config.out), config.optim
    checkpoints = out / "checkpoints"
    _start_logging(out, dist, config)
    latest = latest_checkpoint(checkpoints)
    if latest and not resume:
        raise ConfigError(f"{out} already holds checkpoints of a run (the newest: {latest.name}); pass --resume to "
                          "continue it, or choose another out=DIR")
    point = resume_point(checkpoints, dist) if latest else None  # a damaged newest one falls back, with a warning
    state = point.state if point else {"step": 0, "position": 0}
    if resume and dist.main:
        log.info(f"resuming from {point.folder} (step {state['step']})" if point else f"no checkpoint in "
                 f"{checkpoints}: starting from the beginning")
    _seed_everything(config.seed + dist.rank)
    model, processor = build_model_for(config, dist)
    if point:
        _load_weights(model, point.weights, point.folder / "weights.safetensors")
        point.weights = {}
    wrapped = wrap_model(model, config.strategy, dist)
    sharded = dist.world > 1 and config.strategy == "fsdp2"
    check_evaluation(config, sharded=sharded)
    optimizer = torch.optim.AdamW(param_groups(model, optim), betas=optim.betas)
    budget = Budget(optim, spent=state.get("seconds", 0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, budget.progress))
    if point:
        load_training_state(point, dist=dist, optimizer=optimizer, scheduler=scheduler, sharded=sharded)
        for group in optimizer.param_groups:  # the schedule of this config, even if max_steps changed since
            group["lr"] = group["initial_lr"] * lr_factor(state["step"], optim, budget.progress)
    loader = make_loader(config, processor, dist, start=state["position"])
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    autocast = _autocast(optim.precision, dist.device)
    scaler = torch.amp.GradScaler("cuda") if optim.precision == "fp16" and dist.device.type == "cuda" else None
    metrics = Metrics(out, dist.main, after=state["step"] if resume else None)
    guard = NonFiniteGuard(config.max_nonfinite)
    step, position, batches = state["step"], state["position"], iter(loader)
    bar = tqdm(total=optim.max_steps, initial=step, disable=not dist.main, desc="train", unit="step")
    wrapped.train()
    while step < optim.max_steps and not budget.over:
        started, total_loss, tokens, samples, skipped, origins = time.perf_counter(), 0.0, 0, 0, [], []
        for micro in range(optim.grad_accum):
            batch = next(batches).to(dist.device)
            position += 1
            skipped, origins = skipped + batch.skipped, origins + batch.origins
            # Gradients are averaged across processes once per step, not after every micro-batch.
            quiet = micro < optim.grad_accum - 1 and hasattr(wrapped, "no_sync")
            with wrapped.no_sync() if quiet else nullcontext(), autocast:
                loss = _loss(wrapped, batch) / optim.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            total_loss += loss.item()
            tokens, samples = tokens + batch.tokens, samples + batch.samples
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trainable, optim.clip) if optim.clip else _grad_norm(trainable)
        # All ranks agree, or one would step while another does not and the replicas drift apart. Under fp16 the
        # scaler owns overflowing gradients (it skips that step itself and lowers its scale, as it must while it
        # looks for a scale that fits), so only a non-finite loss counts against max_nonfinite there.
        mean_loss, finite = mean_and_finite(total_loss, [] if scaler else [norm], dist)
        if finite:
            scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        guard.record(finite, step + 1, origins, dist)
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # a skipped first step calls it before optimizer.step(), as intended
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            scheduler.step()  # even after a skip: see guard.py for why a skipped step still counts
        optimizer.zero_grad(set_to_none=True)
        step += 1
        budget.tick(dist)
        last = step == optim.max_steps or budget.over
        seconds = time.perf_counter() - started
        norm = float(norm)
        row = {"step": step, "loss": mean_loss if math.isfinite(mean_loss) else None, "lr": lr,
               "grad_norm": norm if math.isfinite(norm) else None, "samples_per_s": samples * dist.world / seconds,
               "tokens_per_s": tokens * dist.world / seconds, "skipped": len(skipped)}
        for skip in skipped:
            log.warning(f"skipped {skip.origin}: {skip.reason}")
        if step % config.log_every == 0 or last:
            metrics.write({**row, "nonfinite": guard.take()})
        guard.check(step)
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if due(config, step) or (last and config.eval_every > 0):
            scores = evaluate(model, processor, config, step, dist)
            if scores is not None:
                metrics.write({"step": step, "eval": scores})
        if step % config.save_every == 0 or last:
            weights = full_state(wrapped, dist, names)
            check_weights(weights, dist, f"the checkpoint of step {step}")
            save_training_state(checkpoints, step, dist=dist, weights=weights, optimizer=optimizer,
                                scheduler=scheduler, position=position, keep_last=config.keep_last, sharded=sharded,
                                seconds=budget.spent)
    bar.close()
    metrics.close()
    if budget.over and step < optim.max_steps and dist.main:
        log.info(f"stopped at step {step} of {optim.max_steps}: the budget of {optim.max_minutes:g} minutes is spent")
    final = out / "model"
    weights = full_state(wrapped, dist, None)
    check_weights(weights, dist, f"the final model {final}")
    if dist.main:
        if sharded:  # FSDP2 left this process's module sharded: put the gathered weights into a plain copy
            from ..model.model import build_model

            model = build_model(model.config, load_weights=False, tokenizer=processor.tokenizer)[0]
            model.load_state_dict(weights)
        save_checkpoint(model.cpu(), processor, final, trainable_only=config.export == "trainable")
        log.info(f"finished {step} steps; chat with: sparkles chat --model {final}")
    barrier(dist)
    return final


def _loss(model, batch):
    if batch.samples == 0:
        # Every sample of this micro-batch was skipped. The wrapped forward must still run, or this process
        # skips the collectives that DDP/FSDP2 hang on it while the others wait in theirs: it runs on one token,
        # without labels (an all-ignored loss is 0/0 = NaN), and its zero loss adds nothing to the gradients.
        ids = torch.zeros((1, 1), dtype=torch.long, device=batch.input_ids.device)
        loss = model(ids, None, torch.ones_like(ids), None, None).logits.float().sum() * 0.0
        if not loss.requires_grad:  # a frozen LM: text alone reaches no trainable part, but backward needs one
            loss = loss + sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return loss
    return model(batch.input_ids, batch.pixel_values, batch.attention_mask, batch.labels, batch.position_ids).loss


def _grad_norm(params) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _load_weights(model, weights: dict, path: Path) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise CheckpointError(f"{path} holds weights this model does not have: {unexpected[:5]}")


def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _start_logging(out: Path, dist: Dist, config: TrainConfig) -> None:
    if not dist.main:
        logging.getLogger("sparkles").setLevel(logging.ERROR)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(describe(config))
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.sparkles_run = True  # so that the next run in this process (a later stage) replaces it
    root = logging.getLogger("sparkles")
    for old in [h for h in root.handlers if getattr(h, "sparkles_run", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
