"""Staged recipes, the perception stage and the shuffle connector."""

import dataclasses
import json
import random

import pytest
import torch

from sparkles.config import TINY, DataConfig, DataSource, OptimConfig, Stage, TrainConfig
from sparkles.errors import ConfigError, InputError
from sparkles.model.connectors import ShuffleConnector
from sparkles.model.vision import build_vision
from sparkles.train.recipes import _apply
from sparkles.train.stages import STAGE_KINDS, plan, run_stages
from sparkles.world.perception import PerceptionConfig, classes, evaluate, patch_labels, train_perception
from sparkles.world.shapes import Background, Obj, Scene, sample_scene


def recipe(tmp_path, *stages):
    return TrainConfig(model=TINY, data=DataConfig(sources=(DataSource("world:caption"),), max_len=256),
                       optim=OptimConfig(lr_connector=1e-3, lr_lm=1e-3, max_steps=3, batch_size=2),
                       out=str(tmp_path / "run"), save_every=2, stages=stages)


def test_each_stage_starts_from_the_last_and_the_command_line_wins(tmp_path):
    config = recipe(tmp_path, Stage("see", "perception", ("optim.max_steps=7", "optim.lr_vision=0.01")),
                    Stage("talk", "vlm", ("optim.max_steps=9", "optim.lr_vision=0")))
    (s1, c1), (s2, c2) = plan(config, ["optim.max_steps=4"], _apply)
    assert (s1.name, s2.name) == ("see", "talk")
    assert c1.out == str(tmp_path / "run" / "1-see") and c2.out == str(tmp_path / "run" / "2-talk")
    assert c1.init is None and c2.init == str(tmp_path / "run" / "1-see" / "model")
    assert c1.optim.max_steps == c2.optim.max_steps == 4  # the command line's override comes last
    assert c1.optim.lr_vision == 0.01 and c2.optim.lr_vision == 0
    assert c1.stages == c2.stages == ()


def test_a_staged_run_resumes_skipping_finished_stages(tmp_path, monkeypatch):
    ran = []

    def fake(config, *, resume):
        ran.append((config.out, config.init, resume))
        folder = tmp_path / config.out / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        if len(ran) == 2 and not resume:
            raise KeyboardInterrupt  # killed in the second stage, after its model was written
        return folder

    STAGE_KINDS.register("fake", fake)
    config = recipe(tmp_path, Stage("a", "fake"), Stage("b", "fake"), Stage("c", "fake"))
    with pytest.raises(KeyboardInterrupt):
        run_stages(config, [], _apply)
    final = run_stages(config, [], _apply, resume=True)
    assert [r[0].rsplit("/", 1)[-1] for r in ran] == ["1-a", "2-b", "3-c"]  # a and b were not run again
    assert ran[2][1] == str(tmp_path / "run" / "2-b" / "model") and ran[2][2] is True
    assert final == tmp_path / "run" / "3-c" / "model"


def test_an_unknown_stage_kind_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage kind 'dream'.*vlm.*perception"):
        run_stages(recipe(tmp_path, Stage("x", "dream")), [], _apply)


def test_two_vlm_stages_train_and_chain_their_weights(tmp_path):
    config = recipe(tmp_path, Stage("one"), Stage("two", overrides=("optim.lr_lm=0",)))
    final = run_stages(config, ["optim.max_steps=2"], _apply)
    assert (final / "config.json").is_file()
    saved = json.loads((final / "config.json").read_text())
    assert saved["model"]["trainable"] == ["connector"]  # the second stage froze the LM


def test_patch_labels_mark_each_object_centre_once():
    scene = Scene(Background(), (Obj("circle", "red", "big", 0.2, 0.3), Obj("square", "blue", "small", 0.8, 0.9)))
    labels = patch_labels(scene, 8)
    names = classes()
    assert labels[2 * 8 + 1] == 1 + names.index(("circle", "red", "big"))
    assert labels[7 * 8 + 6] == 1 + names.index(("square", "blue", "small"))
    assert sum(label > 0 for label in labels) == 2
    rng = random.Random(0)
    for _ in range(200):  # objects never share a patch, so no label is lost to another
        scene = sample_scene(rng)
        assert sum(label > 0 for label in patch_labels(scene, 8)) == len(scene.objects)


def test_perception_training_writes_its_rows_and_resumes(tmp_path):
    torch.manual_seed(0)
    tower = build_vision(TINY.vision)
    before = evaluate(tower, _probe(tower), TINY.vision, n=32)
    settings = PerceptionConfig(steps=4, batch_size=8, eval_every=2, eval_n=16, save_every=2)
    train_perception(tower, TINY.vision, tmp_path, dataclasses.replace(settings, steps=2), progress=False)
    metrics = train_perception(tower, TINY.vision, tmp_path, settings, progress=False)  # resumes at step 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(metrics) == set(before) == {"patch_accuracy", "object_recall", "background", "scene_exact"}
    assert (tmp_path / "tower.safetensors").is_file()


def _probe(tower):
    from sparkles.world.perception import Probe

    return Probe(tower.out_dim, 1 + len(classes()))


def test_the_shuffle_connector_keeps_every_patch_whole():
    connector = ShuffleConnector(4, 8, num_tokens=16, tokens_per_image=4)
    x = torch.randn(2, 16, 4)
    y = connector(x)
    assert y.shape == (2, 4, 8)
    first = connector.net(torch.cat([x[:, 0], x[:, 1], x[:, 4], x[:, 5]], -1))  # the top-left 2×2 block
    assert torch.allclose(y[:, 0], first, atol=1e-6)
    with pytest.raises(ConfigError, match="tokens_per_image = 4"):
        ShuffleConnector(4, 8, num_tokens=16, tokens_per_image=16)


def test_curves_draw_a_staged_run_with_its_grey_baselines(tmp_path):
    from sparkles.train.curves import read_curves, write_curves

    for k, name in ((1, "perception"), (2, "captions")):
        folder = tmp_path / f"{k}-{name}"
        folder.mkdir()
        rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 41)]
        rows.append({"step": 40, "eval": {"caption": 0.5 * k, "caption_grey": 0.1}})
        lines = [json.dumps(r) for r in rows] + ['{"step": 41, "lo']  # a line cut by a kill is skipped
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    loss, evals, starts = read_curves(tmp_path)
    assert starts == [(0, "1-perception"), (40, "2-captions")]
    assert evals["caption"] == [(40, 0.5), (80, 1.0)] and len(loss) == 80
    svg, md = write_curves(tmp_path)
    text = svg.read_text()
    assert text.startswith("<svg") and "caption_grey" in text and 'stroke-dasharray' in text
    assert "| 80 | 1.000 | 0.100 |" in md.read_text()


def test_curves_say_what_is_missing(tmp_path):
    from sparkles.train.curves import write_curves

    with pytest.raises(InputError, match="no metrics.jsonl"):
        write_curves(tmp_path)


def test_a_config_file_lists_stages(tmp_path):
    from sparkles.train.recipes import build_config

    path = tmp_path / "staged.yaml"
    path.write_text("preset: tiny\nstages:\n  - {name: see, kind: perception, overrides: [optim.lr_vision=0.01]}\n"
                    "  - {name: talk}\n")
    config = build_config(str(path), None, ["out=elsewhere"])
    assert config.stages == (Stage("see", "perception", ("optim.lr_vision=0.01",)), Stage("talk"))
    assert config.out == "elsewhere"


def test_each_stage_logs_to_its_own_train_log(tmp_path):
    config = recipe(tmp_path, Stage("one"), Stage("two"))
    run_stages(config, ["optim.max_steps=1"], _apply)
    first = (tmp_path / "run" / "1-one" / "train.log").read_text()
    second = (tmp_path / "run" / "2-two" / "train.log").read_text()
    assert "2-two/model" not in first and "2-two/model" in second  # each stage's "finished …" line


def test_a_recipe_that_names_its_model_sets_the_text_of_an_init_checkpoint(tmp_path):
    """The paper's recipe starts from an imported SparklesChat-7B, which chats with a system prompt, yet trains
    without one (spec §4.2): the recipe's system prompt wins over the checkpoint's."""
    from sparkles.model.checkpoint import save_checkpoint
    from sparkles.model.model import build_model
    from sparkles.train.loop import build_model_for, init_distributed

    model, processor = build_model(dataclasses.replace(TINY, system_prompt="Be helpful."))
    save_checkpoint(model, processor, tmp_path / "init")
    plain = TrainConfig(init=str(tmp_path / "init"), optim=OptimConfig(lr_connector=1e-3))
    _, kept = build_model_for(plain, init_distributed())
    assert kept.config.system_prompt == "Be helpful."  # no model named: the checkpoint's own text
    paper = dataclasses.replace(plain, model=dataclasses.replace(TINY, system_prompt=""))
    trained, processor = build_model_for(paper, init_distributed())
    assert processor.config.system_prompt == "" and trained.config.system_prompt == ""
