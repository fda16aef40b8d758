"""Training that does not fail silently or stall: NaN/inf steps skipped and counted, a diverged run stopped, NaN
weights never saved; an all-skipped micro-batch under DDP; the CUDA random state in checkpoints; evaluation during
training; length grouping from estimates rather than renderings."""

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch
from conftest import tiny_config
from torch.optim.optimizer import register_optimizer_step_post_hook

from sparkles.config import DataConfig, DataSource, OptimConfig, TrainConfig
from sparkles.conversation import Conversation, Image, Message, Text
from sparkles.errors import ConfigError, SparklesError
from sparkles.train import loop
from sparkles.train.data import BlendSampler, LengthEstimate, TrainDataset
from sparkles.train.evaluators import EVAL_SEED, EVALUATORS, evaluate
from sparkles.train.guard import TrainingDiverged, check_weights
from sparkles.train.records import Sample
from sparkles.train.resume import Dist, rng_state, set_rng_state

WORDS = "red blue green circle square triangle big small left right".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Text-only instructions with answers of varied length: no images to read, so runs stay quick."""
    root = tmp_path_factory.mktemp("guard")
    rng = random.Random(0)
    records = [{"instruction": f"Say something about {rng.choice(WORDS)}.",
                "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))} for _ in range(12)]
    (root / "t.json").write_text(json.dumps(records))
    return root / "t.json"


def config(path, out, max_steps=6, **changes) -> TrainConfig:
    optim = OptimConfig(lr_vision=0.0, lr_connector=3e-3, lr_lm=3e-3, max_steps=max_steps, batch_size=2)
    base = TrainConfig(model=tiny_config(trainable=("connector", "lm")),
                       data=DataConfig(sources=(DataSource(str(path)),), max_len=256), optim=optim, out=str(out),
                       save_every=3, seed=1)
    return dataclasses.replace(base, **changes)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def poison(monkeypatch, steps):
    """Make the loss (and so every gradient) NaN on the given 1-based steps."""
    real, calls = loop._loss, []

    def loss(model, batch):
        calls.append(1)
        value = real(model, batch)
        return value * float("nan") if len(calls) in steps else value
    monkeypatch.setattr(loop, "_loss", loss)


# NaN/inf guard


def test_a_nonfinite_step_is_skipped_counted_and_named(data, tmp_path, monkeypatch):
    poison(monkeypatch, {2, 5})
    final = loop.train(config(data, tmp_path / "run"))
    seen = rows(tmp_path / "run")
    assert [r["nonfinite"] for r in seen] == [0, 1, 0, 0, 1, 0]
    assert seen[1]["loss"] is None and seen[1]["grad_norm"] is None and seen[2]["loss"] is not None
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 2: non-finite loss or gradient norm; optimizer step skipped. Batch: t.json#" in log
    # Had the NaN gradients been applied, the weights would be NaN and the checkpoint of step 3 refused.
    from safetensors.torch import load_file

    weights = load_file(str(final / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_max_nonfinite_steps_in_a_row_stop_the_run_naming_the_step(data, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: 3 steps in a row \(max_nonfinite=3\)"):
        loop.train(config(data, tmp_path / "run", max_nonfinite=3))
    assert [r["nonfinite"] for r in rows(tmp_path / "run")] == [1, 1, 1]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the save of step 3
    assert issubclass(TrainingDiverged, SparklesError)


def test_nan_weights_are_never_saved(data, tmp_path):
    def spoil(optimizer, args, kwargs):  # after the second optimizer step, one weight turns NaN
        spoil.steps += 1
        if spoil.steps == 2:
            optimizer.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
    spoil.steps = 0
    handle = register_optimizer_step_post_hook(spoil)
    try:
        with pytest.raises(TrainingDiverged, match="refusing to save the checkpoint of step 3: expected finite"):
            loop.train(config(data, tmp_path / "run"))
    finally:
        handle.remove()
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
    with pytest.raises(TrainingDiverged, match=r"found NaN/inf in 1 tensors: b"):
        check_weights({"a": torch.ones(2), "b": torch.tensor([1.0, math.inf]), "n": torch.arange(3)}, Dist(), "x")


# An all-skipped micro-batch under DDP


def test_ddp_with_one_rank_s_micro_batch_all_skipped_finishes(tmp_path):
    """Two samples, one truncated away: with one sample per rank and per step, at every step one rank's
    micro-batch is empty while the other's is not; both must still run the wrapped forward."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."},
                                {"instruction": "Describe it. " * 80, "output": "No."}]))
    ranks = [take(BlendSampler([2], [1], batch_size=1, seed=0, rank=r, world_size=2), 3) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [[(0, 0), (0, 1)]] * 3  # sample 1 (the long one) every step
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sparkles.cli", "train",
         "--preset", "tiny", f"data={path}", f"out={tmp_path / 'run'}", "max_steps=3", "save_every=3",
         "optim.batch_size=1", "data.max_len=256", "data.group_by_length=false"],
        env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = rows(tmp_path / "run")
    assert [r["step"] for r in seen] == [1, 2, 3] and all(r["nonfinite"] == 0 for r in seen)
    assert (tmp_path / "run" / "model" / "config.json").is_file()


# The random state in checkpoints


def test_rng_state_round_trips_and_restores_cuda_only_on_as_many_devices(monkeypatch):
    state = rng_state()
    before = (random.random(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), torch.rand(3).tolist()) == before
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1]), torch.tensor([2])])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    saved = rng_state()
    set_rng_state(saved)
    assert [t.tolist() for t in restored[0]] == [[1], [2]]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    set_rng_state(saved)  # another number of devices: left alone, with a warning
    set_rng_state({k: v for k, v in saved.items() if k != "cuda"})  # a checkpoint from before the CUDA state
    assert len(restored) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_random_state_round_trips_on_a_gpu():
    state = rng_state()
    before = torch.rand(4, device="cuda").tolist()
    set_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == before


# Evaluation during training


def fake_evaluator(model, processor, *, n, seed):
    fake_evaluator.calls.append((model.training, n, seed))
    torch.rand(100), random.random()  # draws from the streams training uses; they must be put back
    return {"acc": len(fake_evaluator.calls) / 10, "acc_grey": 0.0}


def test_evaluation_runs_every_eval_every_steps_and_at_the_end(data, tmp_path):
    EVALUATORS.register("fake", fake_evaluator)
    fake_evaluator.calls = []
    loop.train(config(data, tmp_path / "run", max_steps=5, eval_every=2, eval_n=3, evaluator="fake"))
    evals = [r for r in rows(tmp_path / "run") if "eval" in r]
    assert evals == [{"step": 2, "eval": {"acc": 0.1, "acc_grey": 0.0}}, {"step": 4, "eval": {"acc": 0.2,
                     "acc_grey": 0.0}}, {"step": 5, "eval": {"acc": 0.3, "acc_grey": 0.0}}]
    assert fake_evaluator.calls == [(False, 3, EVAL_SEED)] * 3  # in eval mode, one fixed seed
    assert "eval at step 4 (fake, n=3): acc 0.200, acc_grey 0.000" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ConfigError, match="unknown evaluator 'nope'"):
        loop.train(config(data, tmp_path / "bad", eval_every=1, evaluator="nope"))


def test_evaluation_leaves_train_mode_and_random_streams_as_they_were(tiny):
    model, processor = tiny
    EVALUATORS.register("fake", fake_evaluator)
    fake_evaluator.calls = []
    model.train()
    state = (random.getstate(), torch.get_rng_state())
    scores = evaluate(model, processor, TrainConfig(evaluator="fake", eval_n=2), 7, Dist())
    assert scores == {"acc": 0.1, "acc_grey": 0.0} and model.training
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])


def test_eval_rows_reach_tensorboard_as_eval_slash_name(tmp_path):
    metrics = loop.Metrics(tmp_path, True)
    added = []
    metrics.board = type("Board", (), {"add_scalar": lambda self, *a: added.append(a), "close": lambda self: None})()
    metrics.write({"step": 4, "eval": {"acc": 0.5}, "loss": 1.5, "nonfinite": 0})
    metrics.close()
    assert added == [("eval/acc", 0.5, 4), ("loss", 1.5, 4), ("nonfinite", 0, 4)]


# Length grouping from estimates


def sample(i, answer_words, images=0):
    parts = tuple(Image(label=f"{k}") for k in range(1, images + 1)) + (Text(f"Tell me {i % 10}."),)
    answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(answer_words))
    return Sample(Conversation((Message("user", parts), Message.text_only("assistant", answer))), "last", f"s#{i}")


def take(sampler, n):
    return [batch for batch, _ in zip(sampler, range(n))]


def counting(processor, monkeypatch):
    calls = []
    real = processor.render
    monkeypatch.setattr(processor, "render", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_grouping_by_estimate_gives_the_batches_of_grouping_by_rendering(tiny):
    _, processor = tiny
    rng = random.Random(1)
    samples = [sample(i, rng.randint(1, 30), images=rng.choice((0, 1, 2))) for i in range(64)]
    dataset = TrainDataset([samples], processor, max_len=4096)
    estimate = LengthEstimate([samples], processor, max_len=4096)
    assert all(estimate((0, i)) == dataset.length((0, i)) for i in range(64))  # a byte tokenizer: exact
    exact = BlendSampler([64], [1], batch_size=4, seed=0, lengths=dataset.length, group=4)
    estimated = BlendSampler([64], [1], batch_size=4, seed=0, lengths=estimate, group=4)
    assert take(estimated, 40) == take(exact, 40)


def test_lengths_are_estimated_without_rendering_every_sample_and_grouping_still_cuts_padding(tiny, monkeypatch):
    _, processor = tiny
    rng = random.Random(2)
    samples = [sample(i, rng.randint(1, 60), images=rng.choice((0, 3))) for i in range(400)]
    real = TrainDataset([samples], processor, max_len=4096).length
    calls = counting(processor, monkeypatch)
    estimate = LengthEstimate([samples], processor, max_len=4096)
    grouped = take(BlendSampler([400], [1], batch_size=8, seed=0, lengths=estimate), 48)
    assert len(calls) <= 32  # the calibration only, not the 384 samples grouped
    plain = take(BlendSampler([400], [1], batch_size=8, seed=0), 48)
    monkeypatch.undo()

    def padding(batches):
        return sum(max(real(k) for k in b) * len(b) - sum(real(k) for k in b) for b in batches)
    assert padding(grouped) < padding(plain) / 2


class Endless(Sequence):
    """A source made on the fly, as `world:caption` is: indexing it is costly, so it must happen rarely."""

    def __init__(self):
        self.made = 0

    def __len__(self):
        return 10_000_000

    def __getitem__(self, i):
        self.made += 1
        return sample(i, 1 + i % 7, images=1)


class Hinted(Endless):
    """One that tells the size of sample i cheaply: (characters of text, images, messages)."""

    def size_hint(self, i):
        s = sample(i, 1 + i % 7, images=1).conversation
        return sum(len(p.text) for m in s for p in m.parts if isinstance(p, Text)), 1, 2


def test_endless_sources_are_grouped_without_being_indexed_per_sample(tiny):
    _, processor = tiny
    source, hinted, listed = Endless(), Hinted(), [sample(i, 40, images=3) for i in range(50)]
    estimate = LengthEstimate([source, listed], processor, max_len=4096)
    made = source.made
    assert made <= 32
    batches = take(BlendSampler([len(source), 50], [1, 1], batch_size=4, seed=0, lengths=estimate), 20)
    assert source.made == made and len(batches) == 20
    assert estimate((0, 5)) == estimate((0, 6)) < estimate((1, 0))  # its mean, below the long listed samples
    estimate = LengthEstimate([hinted], processor, max_len=4096)
    exact = TrainDataset([hinted], processor, max_len=4096).length
    assert [estimate((0, i)) for i in range(7)] == [exact((0, i)) for i in range(7)]
