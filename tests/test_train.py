"""Training: the schedule, parameter groups, overfitting a batch, frozen parts, LoRA, resume, DDP, kill -9."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed
from conftest import tiny_config
from PIL import Image as PILImage

from sparkles.config import DataConfig, DataSource, LoraConfig, OptimConfig, TrainConfig
from sparkles.errors import ConfigError
from sparkles.train.loop import lr_factor, param_groups, train
from sparkles.train.recipes import PRESETS, build_config

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six two-turn dialogues about solid-colour images, in SparklesDialogue format."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    records = []
    for n in range(6):
        names = list(COLOURS)[n % 3:] + list(COLOURS)[:n % 3]
        ids = [f"{n}-{k}" for k in range(3)]
        for i, c in zip(ids, names):
            PILImage.new("RGB", (24, 24), COLOURS[c]).save(root / "images" / f"{i}.png")
        records.append({"dialogue": [
            {"role": "user", "content": f"Colours of IMAGE#{ids[0]}<Img><ImageHere></Img> and IMAGE#{ids[1]}"
                                        "<Img><ImageHere></Img>?",
             "images": [{"image_id": ids[0]}, {"image_id": ids[1]}]},
            {"role": "assistant", "content": f"IMAGE#{ids[0]} is {names[0]}, IMAGE#{ids[1]} is {names[1]}."},
            {"role": "user", "content": f"And IMAGE#{ids[2]}<Img><ImageHere></Img>?", "images": [{"image_id": ids[2]}]},
            {"role": "assistant", "content": f"IMAGE#{ids[2]} is {names[2]}."}]})
    (root / "d.json").write_text(json.dumps(records))
    return root


def config(dataset, out, **optim) -> TrainConfig:
    small = tiny_config(trainable=("vision", "connector", "lm"))
    settings = {"lr_vision": 3e-3, "lr_connector": 3e-3, "lr_lm": 3e-3, "max_steps": 6, "batch_size": 4, **optim}
    return TrainConfig(model=small, data=DataConfig(sources=(DataSource(str(dataset / "d.json")),), max_len=256),
                       optim=OptimConfig(**settings), out=str(out), save_every=3, seed=1)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_original_schedule_is_reproduced():
    """Spec §6.2's table: warm-up from 1e-6 over 400 steps, then a cosine over all 2000 steps down to 1e-5."""
    optim = PRESETS["sparkleschat-7b"].optim
    expected = {0: 1.0e-6, 200: 1.55e-5, 399: 2.993e-5, 400: 2.809e-5, 1000: 2.0e-5, 1999: 1.0e-5}
    for step, lr in expected.items():
        assert lr_factor(step, optim) * optim.lr_connector == pytest.approx(lr, rel=2e-3), step


def test_a_time_budget_ends_the_cosine_early():
    optim = OptimConfig(warmup_steps=10, max_steps=1000, min_lr=0.1, max_minutes=5)
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 490 / 990))
    assert lr_factor(500, optim, time_progress=0.0) == pytest.approx(cosine)
    assert lr_factor(500, optim, time_progress=1.0) == pytest.approx(0.1)  # time is up: the bottom of the cosine
    assert lr_factor(500, optim, time_progress=0.2) == lr_factor(500, optim)  # the steps are the nearer bound
    assert lr_factor(5, optim, time_progress=0.9) == pytest.approx(0.6)  # the warm-up follows its steps only


def test_a_run_stops_at_its_time_budget_saves_and_resumes_with_the_time_spent(dataset, tmp_path):
    out = tmp_path / "run"
    cfg = config(dataset, out, max_steps=10_000, max_minutes=0.5 / 60, warmup_steps=0)
    final = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = rows[-1]["step"]
    assert 1 <= step < 10_000 and (final / "model.safetensors").is_file()
    state = json.loads(next(iter((out / "checkpoints").glob(f"step-{step:06d}/state.json"))).read_text())
    assert state["step"] == step and state["seconds"] >= 0.5
    assert rows[-1]["lr"] < 3e-3  # the cosine followed the clock down
    # The budget counts across resumes: a resumed run with no time left does not step again.
    train(cfg, resume=True)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step


def test_parameter_groups_freeze_parts_at_rate_zero_and_decay_only_matrices(tiny):
    model, _ = tiny
    model.set_trainable(("vision", "connector", "lm"))
    groups = param_groups(model, OptimConfig(lr_connector=1e-3, lr_lm=2e-4))
    assert {g["part"] for g in groups} == {"connector", "lm"}
    for g in groups:
        assert all(p.dim() >= 2 for p in g["params"]) if g["weight_decay"] else True
    with pytest.raises(ConfigError, match="nothing to train"):
        param_groups(model, OptimConfig(lr_connector=0))


def test_a_few_steps_overfit_one_batch_and_frozen_parts_stay_bit_identical(dataset, tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(json.loads((dataset / "d.json").read_text())[:1]))  # one dialogue: 2 samples
    cfg = config(dataset, tmp_path / "run", max_steps=30, lr_vision=0.0, lr_connector=1e-2, lr_lm=1e-2,
                 batch_size=2, min_lr=1.0)
    cfg = dataclasses.replace(cfg, save_every=100, data=dataclasses.replace(
        cfg.data, sources=(DataSource(str(one), images=str(dataset / "images")),)))
    torch.manual_seed(1)
    from sparkles.model.model import build_model

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        before, _ = build_model(cfg.model)
    final = train(cfg)
    seen = losses(tmp_path / "run")
    assert seen[-1] < seen[0] / 5, seen  # memorised: the loss falls more than five-fold
    from sparkles.model.checkpoint import load_checkpoint

    after, _ = load_checkpoint(final)
    for (name, a), b in zip(before.vision.state_dict().items(), after.vision.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(before.connector.state_dict()["queries"], after.connector.state_dict()["queries"])


def test_resume_after_a_kill_gives_the_same_losses(dataset, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(config(dataset, whole))
    import sparkles.train.loop as module

    real = module.save_training_state

    def save_then_die(folder, step, **kw):
        real(folder, step, **kw)
        if step == 3:
            raise KeyboardInterrupt  # the process dies right after its checkpoint
    monkeypatch.setattr(module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(dataset, tmp_path / "cut"))
    monkeypatch.setattr(module, "save_training_state", real)
    with pytest.raises(ConfigError, match="pass --resume"):
        train(config(dataset, tmp_path / "cut"))
    train(config(dataset, tmp_path / "cut"), resume=True)
    assert losses(tmp_path / "cut") == losses(whole)


def test_lora_adapters_train_alone_and_reload(dataset, tmp_path):
    model_config = tiny_config(lora=LoraConfig(r=4, alpha=8), trainable=("connector", "lm"))
    cfg = dataclasses.replace(config(dataset, tmp_path / "lora", lr_vision=0.0), model=model_config)
    final = train(cfg)
    from safetensors.torch import load_file

    from sparkles.model.checkpoint import load_checkpoint
    from sparkles.model.model import build_model

    weights = load_file(str(final / "model.safetensors"))
    assert any("lora_A" in k for k in weights)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        base, _ = build_model(model_config)
    loaded, _ = load_checkpoint(final)
    lm = dict(loaded.lm.named_parameters())
    for name, param in base.lm.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, lm[name]), name  # the LM's own weights never moved
    assert any(not torch.equal(p, lm[n]) for n, p in base.lm.named_parameters() if "lora_B" in n)


def test_overrides_and_presets_build_typed_configs(tmp_path):
    cfg = build_config(None, "tiny", ["data=a.json:2,b.json", "images=imgs", "out=x", "max_steps=7",
                                      "save_every=2", "seed=5", "optim.lr_lm=1e-4"])
    assert [(s.path, s.ratio, s.images) for s in cfg.data.sources] == [("a.json", 2.0, "imgs"), ("b.json", 1.0, "imgs")]
    assert (cfg.out, cfg.optim.max_steps, cfg.save_every, cfg.seed, cfg.optim.lr_lm) == ("x", 7, 2, 5, 1e-4)
    with pytest.raises(ConfigError, match="unknown key 'optim.lr_fast'; valid keys here: .*lr_lm"):
        build_config(None, "tiny", ["optim.lr_fast=1"])
    with pytest.raises(ConfigError, match="max_steps must be int"):
        build_config(None, "tiny", ["max_steps=many"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: tiny\noptim:\n  max_steps: 9\nout: y\n")
    cfg = build_config(str(yaml_file), None, ["seed=2"])
    assert (cfg.optim.max_steps, cfg.optim.batch_size, cfg.out, cfg.seed) == (9, 4, "y", 2)


def _ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from sparkles.train.loop import init_distributed, wrap_model

    dist = init_distributed()
    model, batch = _ddp_model_and_batch(rank)
    wrapped = wrap_model(model, "ddp", dist)
    wrapped(**batch).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    torch.distributed.destroy_process_group()


def _ddp_model_and_batch(rank):
    from sparkles.model.model import build_model

    torch.manual_seed(0)
    model, _ = build_model(tiny_config(trainable=("connector", "lm")))
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(4, 250, (3, 12), generator=g)
    return model, {"input_ids": ids, "labels": ids.clone()}


def test_two_process_ddp_gives_the_gradients_of_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "grads.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "grads.pt")
    model, first = _ddp_model_and_batch(0)
    _, second = _ddp_model_and_batch(1)
    ((model(**first).loss + model(**second).loss) / 2).backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, ddp[name], atol=1e-6), name


def run_cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sparkles.cli", "train", "--preset", "tiny", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(dataset, tmp_path):
    args = [f"data={dataset / 'd.json'}", f"out={tmp_path / 'run'}", "max_steps=40", "save_every=4",
            "optim.batch_size=2"]
    process = run_cli(args)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoints" / "step-000008").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = run_cli([*args, "--resume"])
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert "resuming from" in err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_torchrun_two_processes_train_end_to_end(dataset, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sparkles.cli", "train",
         "--preset", "tiny", f"data={dataset / 'd.json'}", f"out={tmp_path / 'run'}", "max_steps=4",
         "save_every=2", "optim.batch_size=2"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_torchrun_runs_a_staged_recipe_stage_after_stage(dataset, tmp_path):
    """Every stage trains in the one process group torchrun gave the processes (the second stage used to fail
    with "trying to initialize the default process group twice"), and starts from the stage before."""
    config = tmp_path / "staged.json"
    config.write_text(json.dumps({"stages": [{"name": "first", "overrides": ["optim.max_steps=1"]},
                                             {"name": "second", "overrides": ["optim.max_steps=2"]}]}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sparkles.cli", "train",
         "--preset", "tiny", str(config), f"data={dataset / 'd.json'}", f"out={tmp_path / 'run'}",
         "optim.batch_size=2"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for stage, steps in (("1-first", [1]), ("2-second", [1, 2])):
        rows = [json.loads(line) for line in (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == steps
        assert (tmp_path / "run" / stage / "model" / "model.safetensors").is_file()
    second = json.loads((tmp_path / "run" / "2-second" / "config.json").read_text())
    assert second["init"] == str(tmp_path / "run" / "1-first" / "model")
