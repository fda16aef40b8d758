"""The peers' variants (spec/peers.md): SPHINX's weight mixing and mixed visual embeddings."""

import dataclasses

import pytest
import torch
from conftest import solid, tiny_config

from sparkles.cli import main
from sparkles.config import VisionConfig
from sparkles.conversation import Conversation, user_message
from sparkles.errors import CheckpointError, ConfigError
from sparkles.model.checkpoint import load_checkpoint, save_checkpoint
from sparkles.model.merge import merge_checkpoints
from sparkles.model.model import build_model


def _saved(folder, seed, config=None):
    torch.manual_seed(seed)
    model, processor = build_model(config or tiny_config())
    return save_checkpoint(model, processor, folder)


@pytest.fixture
def pair(tmp_path):
    return _saved(tmp_path / "a", 0), _saved(tmp_path / "b", 1)


def _state(folder):
    return load_checkpoint(folder)[0].state_dict()


def test_weights_one_and_zero_give_the_first_checkpoint_exactly(pair, tmp_path):
    a, b = pair
    merged = _state(merge_checkpoints([a, b], tmp_path / "m", [1.0, 0.0]))
    expected = _state(a)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_half_and_half_gives_the_mean(pair, tmp_path):
    a, b = pair
    merged, sa, sb = _state(merge_checkpoints([a, b], tmp_path / "m", [0.5, 0.5])), _state(a), _state(b)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    for key in sa:
        assert torch.allclose(merged[key], (sa[key] + sb[key]) / 2, atol=1e-7), key


def test_parts_not_listed_come_from_the_first_checkpoint(pair, tmp_path):
    a, b = pair
    merged = _state(merge_checkpoints([a, b], tmp_path / "m", [0.25, 0.75], parts=("connector",)))
    sa, sb = _state(a), _state(b)
    for key in sa:
        if key.startswith("connector."):
            assert torch.allclose(merged[key], 0.25 * sa[key] + 0.75 * sb[key], atol=1e-7), key
        else:
            assert torch.equal(merged[key], sa[key]), key


def test_the_merge_command_writes_a_checkpoint_that_loads(pair, tmp_path, capsys):
    a, b = pair
    assert main(["merge", str(tmp_path / "m"), str(a), str(b), "--weights", "0.5,0.5", "--parts", "lm"]) == 0
    assert "lm = 0.5×" in capsys.readouterr().out
    load_checkpoint(tmp_path / "m")


def test_different_architectures_are_refused_naming_the_difference(pair, tmp_path):
    a, _ = pair
    other = _saved(tmp_path / "c", 2, tiny_config(tokens_per_image=8))
    with pytest.raises(CheckpointError, match=r"different architectures.*tokens_per_image: 4 vs 8"):
        merge_checkpoints([a, other], tmp_path / "m")


def test_trainable_flags_alone_do_not_make_another_architecture(pair, tmp_path):
    a, _ = pair
    other = _saved(tmp_path / "c", 2, tiny_config(trainable=("connector", "lm")))
    merge_checkpoints([a, other], tmp_path / "m")


def test_different_stored_keys_or_shapes_are_refused_by_name(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    a, b = pair
    state = load_file(str(b / "model.safetensors"))
    state.pop("connector.queries")
    save_file(state, str(b / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"store different weights.*connector\.queries"):
        merge_checkpoints([a, b], tmp_path / "m")
    state["connector.queries"] = torch.zeros(5, 32)
    save_file(state, str(b / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"different shapes.*connector\.queries: \[4, 32\] vs \[5, 32\]"):
        merge_checkpoints([a, b], tmp_path / "m")


def test_weights_must_sum_to_one_unless_allowed(pair, tmp_path):
    a, b = pair
    with pytest.raises(ConfigError, match="sum to 1.*summing to 0.9"):
        merge_checkpoints([a, b], tmp_path / "m", [0.5, 0.4])
    merged = _state(merge_checkpoints([a, b], tmp_path / "m", [2.0, 0.0], allow_any_sum=True, parts=("lm",)))
    assert torch.equal(merged["lm.lm_head.weight"], 2 * _state(a)["lm.lm_head.weight"])
    with pytest.raises(ConfigError, match="2 checkpoints need 2 weights, got 3"):
        merge_checkpoints([a, b], tmp_path / "m", [0.5, 0.25, 0.25])


def test_an_unknown_part_is_refused_with_the_known_ones(pair, tmp_path):
    a, b = pair
    with pytest.raises(ConfigError, match=r"unknown parts \['llm'\].*'vision', 'connector', 'lm'"):
        merge_checkpoints([a, b], tmp_path / "m", parts=("llm",))
    assert main(["merge", str(tmp_path / "m"), str(a), str(b), "--parts", "llm"]) == 2


# Mixed visual embeddings: our tiny ViT (32 px, patch 8: 16 tokens of width 32) + an HF tower of 16 tokens.
DINO = {"model_type": "dinov2", "image_size": 32, "patch_size": 8, "hidden_size": 24, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 2}
CLIP = {"model_type": "clip_vision_model", "image_size": 64, "patch_size": 16, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
IMAGENET = dict(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


def _mixed(extra: VisionConfig, **changes):
    base = tiny_config(connector="mlp", tokens_per_image=16, **changes)
    return dataclasses.replace(base, vision=dataclasses.replace(base.vision, extra=extra))


def _logits(model, processor):
    conversation = Conversation((user_message("Compare <image> with <image>", [solid("red"), solid("blue")]),))
    encoded = processor.encode(conversation, generation=True)
    with torch.no_grad():
        return model(torch.tensor([encoded.rendered.input_ids]), encoded.pixel_values).logits


@pytest.mark.parametrize("extra", [
    VisionConfig(kind="hf", config=DINO, image_size=32, **IMAGENET),  # CLS dropped: 16 patches, renormalised
    VisionConfig(kind="hf", config=CLIP, image_size=64),  # 64 px in patches of 16: 16 tokens, input resized
], ids=["dinov2", "clip"])
def test_mixed_towers_join_channels_and_reload_to_identical_logits(extra, tmp_path):
    torch.manual_seed(0)
    model, processor = build_model(_mixed(extra))
    width = 32 + extra.config["hidden_size"]
    assert (model.vision.num_tokens, model.vision.out_dim) == (16, width)
    features = model.vision(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 16, width)
    model.eval()
    before = _logits(model, processor)
    save_checkpoint(model, processor, tmp_path / "ck")
    reloaded, reprocessor = load_checkpoint(tmp_path / "ck")
    assert reloaded.config.vision.extra.config["model_type"] == extra.config["model_type"]
    assert torch.equal(_logits(reloaded, reprocessor), before)


def test_the_main_tower_reads_the_pixels_and_the_extra_tower_its_own_statistics():
    torch.manual_seed(0)
    model, _ = build_model(_mixed(VisionConfig(kind="hf", config=DINO, image_size=32, **IMAGENET)))
    pixels = torch.randn(1, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET["image_mean"]).view(1, 3, 1, 1), torch.tensor(IMAGENET["image_std"])
    raw = pixels * torch.tensor(model.config.vision.image_std).view(1, 3, 1, 1) + torch.tensor(
        model.config.vision.image_mean).view(1, 3, 1, 1)
    with torch.no_grad():
        joined = model.vision(pixels)
        assert torch.equal(joined[..., :32], model.vision.main(pixels))
        assert torch.allclose(joined[..., 32:], model.vision.extra((raw - mean) / std.view(1, 3, 1, 1)), atol=1e-5)


def test_towers_with_different_token_counts_are_refused_with_both_counts():
    extra = VisionConfig(kind="hf", config=dict(DINO, patch_size=4), image_size=32)  # 64 patches
    with pytest.raises(ConfigError, match=r"same number of tokens.*vision \(tiny\) gives 16, vision.extra \(hf\) "
                                          r"gives 64"):
        build_model(_mixed(extra))


def test_without_extra_the_model_is_built_exactly_as_before():
    from sparkles.model.vision import TinyViT

    torch.manual_seed(0)
    model, _ = build_model(tiny_config())
    assert isinstance(model.vision, TinyViT) and model.config.vision.extra is None
    assert all(k.startswith(("vision.patch", "vision.position", "vision.blocks", "vision.norm"))
               for k in model.state_dict() if k.startswith("vision."))


def test_mixed_towers_are_refused_by_the_llava_export_with_the_reason():
    from sparkles.model.export import check_exportable

    model, _ = build_model(_mixed(VisionConfig(kind="hf", config=DINO, image_size=32)))
    with pytest.raises(CheckpointError, match=r"mixed vision towers \(vision.extra\)"):
        check_exportable(model)
