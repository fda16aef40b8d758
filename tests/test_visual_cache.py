"""ImageBind-LLM's visual cache: the blend's arithmetic, building from a folder, checkpoints that switch it on,
cached decoding, and the model it is off in."""

import dataclasses
import json

import pytest
import torch
from conftest import solid, tiny_config
from PIL import Image as PILImage

from sparkles.cli import main
from sparkles.config import SamplingParams, VisualCacheConfig
from sparkles.conversation import Conversation, user_message
from sparkles.errors import ConfigError, ImageLoadError
from sparkles.generate import Chat
from sparkles.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from sparkles.model.model import build_model
from sparkles.model.visual_cache import VisualCache, blend, build_visual_cache, load_visual_cache, save_visual_cache
from sparkles.processor import image_to_tensor
from sparkles.session import ChatSession

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}
GREEDY = SamplingParams(max_new_tokens=8)


def model_for(seed=0):
    torch.manual_seed(seed)
    model, processor = build_model(tiny_config())
    return model.eval(), processor


def folder_of(tmp_path, colours=COLOURS):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, rgb in colours.items():
        PILImage.new("RGB", (40, 30), rgb).save(folder / f"{name}.png")
    return folder


def features(model, colour):
    pixels = image_to_tensor(PILImage.new("RGB", (40, 30), COLOURS[colour]), model.config.vision)[None]
    with torch.no_grad():
        return model.vision(pixels)  # (1, P, C)


def cache_of(model, tmp_path, colours=COLOURS, **settings):
    path = save_visual_cache(build_visual_cache(model, folder_of(tmp_path, colours)), tmp_path / "cache.pt")
    return load_visual_cache(VisualCacheConfig(path=str(path), **settings))


def test_weight_zero_leaves_the_features_unchanged(tmp_path):
    model, processor = model_for()
    cache = cache_of(model, tmp_path, weight=0.0, k=2)
    red = features(model, "red")
    assert torch.equal(cache(red, model.vision), red)
    encoded = processor.encode(Conversation((user_message("What is IMAGE#1?", [solid("red")]),)))
    before = model.encode_images(encoded.pixel_values)
    model.visual_cache = cache
    assert torch.equal(model.encode_images(encoded.pixel_values), before)


def test_an_image_in_the_cache_with_k_1_is_its_own_neighbour_and_another_is_a_known_mix(tmp_path):
    model, _ = model_for()
    cache = cache_of(model, tmp_path, colours={"red": COLOURS["red"]}, k=1, weight=0.3)
    red, blue = features(model, "red"), features(model, "blue")
    assert cache.sources == ("red.png",)
    assert torch.allclose(cache(red, model.vision), red, atol=1e-6)  # 0.7·f + 0.3·f
    assert torch.allclose(cache(blue, model.vision), 0.7 * blue + 0.3 * red, atol=1e-6)


def test_k_neighbours_are_weighted_by_a_softmax_of_their_similarities():
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]), dim=-1)
    values = torch.stack([torch.full((3, 2), float(v)) for v in (1, 2, 3)])  # (M=3, P=3, C=2)
    query = torch.tensor([[[2.0, 0.0]] * 3])  # mean direction (1, 0): similarities 1, 0.6, -1
    w = torch.softmax(torch.tensor([1.0, 0.6]) * 5.0, 0)
    expected = 0.5 * query + 0.5 * (w[0] * 1 + w[1] * 2)
    assert torch.allclose(blend(query, keys, values, k=2, weight=0.5, temperature=5.0), expected)


def test_an_unreadable_image_stops_the_build_naming_the_file_or_is_skipped_and_listed(tmp_path, capsys):
    model, processor = model_for()
    folder = folder_of(tmp_path)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match=r"broken\.png"):
        build_visual_cache(model, folder)
    skipped = []
    data = build_visual_cache(model, folder, skip_unreadable=True, skipped=skipped)
    assert data["sources"] == ["blue.png", "green.png", "red.png"] and len(skipped) == 1 and "broken.png" in skipped[0]
    model_folder = save_checkpoint(model, processor, tmp_path / "model")
    assert main(["visual-cache", "build", "--model", str(model_folder), "--images", str(folder),
                 "--out", str(tmp_path / "c.pt")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["visual-cache", "build", "--model", str(model_folder), "--images", str(folder),
                 "--out", str(tmp_path / "c.pt"), "--skip-unreadable"]) == 0
    out = capsys.readouterr().out
    assert "skipped: " in out and "broken.png" in out and "3 images" in out


def test_the_commands_build_a_cache_and_a_checkpoint_that_reloads_with_it(tmp_path, capsys):
    model, processor = model_for()
    source = save_checkpoint(model, processor, tmp_path / "model")
    folder = folder_of(tmp_path)
    assert main(["visual-cache", "build", "--model", str(source), "--images", str(folder),
                 "--out", str(tmp_path / "cache.pt")]) == 0
    assert main(["visual-cache", "use", "--model", str(source), "--cache", str(tmp_path / "cache.pt"),
                 "--out", str(tmp_path / "cached"), "--k", "2", "--weight", "0.25", "--temperature", "1"]) == 0
    config, _ = read_config(tmp_path / "cached")
    assert config.visual_cache == VisualCacheConfig(path=str((tmp_path / "cache.pt").resolve()), k=2, weight=0.25,
                                                    temperature=1.0)
    assert read_config(source)[0].visual_cache == VisualCacheConfig()  # the source is left as it was
    loaded, loaded_processor = load_checkpoint(tmp_path / "cached")
    assert isinstance(loaded.visual_cache, VisualCache) and loaded.visual_cache.k == 2
    # Saved again, the switch survives another round trip.
    again = save_checkpoint(loaded, loaded_processor, tmp_path / "again")
    assert read_config(again)[0].visual_cache == config.visual_cache
    blue = features(loaded, "blue")
    expected = blend(blue, loaded.visual_cache.keys, loaded.visual_cache.values, k=2, weight=0.25, temperature=1.0)
    assert torch.allclose(loaded.visual_cache(blue, loaded.vision), expected)
    assert not torch.allclose(expected, blue, atol=1e-2)  # a cool softmax lets the second neighbour in


def test_a_cache_built_with_another_tower_is_refused_on_first_use(tmp_path):
    model, processor = model_for(seed=0)
    other, _ = model_for(seed=1)
    other.visual_cache = cache_of(model, tmp_path)
    encoded = processor.encode(Conversation((user_message("What is IMAGE#1?", [solid("red")]),)))
    with pytest.raises(ConfigError, match="another vision tower"):
        other.encode_images(encoded.pixel_values)
    with pytest.raises(ConfigError, match="no cache file"):
        load_visual_cache(VisualCacheConfig(path=str(tmp_path / "missing.pt")))


def test_cached_decoding_equals_full_recomputation_with_the_cache_on(tmp_path):
    model, processor = model_for()
    model.visual_cache = cache_of(model, tmp_path, k=2)
    chat, session = Chat(model, processor), ChatSession(model, processor)
    conversation = Conversation()
    for text, colours in [("Compare IMAGE#1 with IMAGE#2.", ["red", "blue"]), ("Is <image> like IMAGE#1?", ["green"])]:
        images = [solid(c) for c in colours]
        conversation = conversation.append(user_message(text, images, known=conversation.labels))
        assert "".join(session.stream(text, images, GREEDY)).strip() == chat.answer(conversation, GREEDY)
        conversation = session.conversation


def test_training_never_blends_and_the_cache_is_no_weight(tmp_path):
    model, processor = model_for()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.visual_cache = cache_of(model, tmp_path, k=1, weight=1.0)
    assert model.state_dict().keys() == plain.keys()
    encoded = processor.encode(Conversation((user_message("What is IMAGE#1?", [solid("blue")]),)))
    blended = model.encode_images(encoded.pixel_values)
    model.train()
    trained = model.encode_images(encoded.pixel_values)
    model.visual_cache = None
    assert torch.equal(trained, model.encode_images(encoded.pixel_values))
    assert not torch.allclose(blended, trained)
    assert json.loads(json.dumps(dataclasses.asdict(model.config)))["visual_cache"]["path"] is None
