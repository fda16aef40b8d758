"""The image cache: an image's bytes decoded and preprocessed once for every request that sends them again, within
a bound of bytes, each hit still checked against the limits of the call that finds it; a server's answers the same
with it and without."""

import dataclasses

import pytest
from PIL import Image as PILImage

import sparkles.image as image_module
import sparkles.processor as processor_module
from sparkles.config import TileConfig
from sparkles.conversation import Image
from sparkles.errors import ImageLoadError
from sparkles.image import load_image, to_data_uri
from sparkles.image_cache import ImageCache
from sparkles.processor import Processor


def url(color: str, size=(48, 40)) -> str:
    return to_data_uri(PILImage.new("RGB", size, color))


@pytest.fixture
def decodes(monkeypatch):
    """The labels of the images `load_image` decodes."""
    seen, real = [], image_module._decode

    def counting(open_image, label, *args):
        seen.append(label)
        return real(open_image, label, *args)

    monkeypatch.setattr(image_module, "_decode", counting)
    return seen


def test_the_cache_keeps_the_most_recent_within_its_bytes():
    cache = ImageCache(100)
    for k in range(4):
        cache.put(("pixels", str(k)), k, 30)
    assert cache.get(("pixels", "0")) is None and cache.get(("pixels", "3")) == 3
    cache.get(("pixels", "1"))  # now the most recent: "2" goes first
    cache.put(("pixels", "4"), 4, 30)
    assert [cache.get(("pixels", k)) for k in "1234"] == [1, None, 3, 4]
    cache.put(("pixels", "big"), "x", 101)  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get(("pixels", "big")) is None and cache.nbytes == 90
    stats = cache.stats()
    assert stats["entries"] == 3 and stats["evicted"] == 2 and stats["capacity_bytes"] == 100
    assert (stats["pixels_hits"], stats["pixels_misses"]) == (5, 3)


def test_bytes_seen_before_are_not_decoded_again_and_still_meet_each_calls_limits(decodes):
    cache, red = ImageCache(1 << 20), url("red")
    first = load_image(red, cache=cache)
    again = load_image(red, cache=cache)
    assert again.pixels is first.pixels and again.sha256 == first.sha256 and len(decodes) == 1
    blue = load_image(url("blue"), cache=cache)  # other bytes: decoded, never mistaken for the red one
    assert len(decodes) == 2 and blue.pixels.getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(ImageLoadError, match="48x40"):
        load_image(red, cache=cache, max_pixels=100)
    sizes = []
    load_image(red, cache=cache, check_size=sizes.append)
    assert sizes == [(48, 40)] and len(decodes) == 2


def test_model_inputs_are_made_once_per_image_and_per_way_of_making_them(tiny, monkeypatch):
    _, processor = tiny
    made, real = [], processor_module.image_to_tensor
    monkeypatch.setattr(processor_module, "image_to_tensor", lambda pixels, config: made.append(1) or real(pixels,
                                                                                                          config))
    cache = ImageCache(1 << 24)
    images = [Image(pixels=load_image(url(c)).pixels, sha256=load_image(url(c)).sha256) for c in ("red", "blue")]
    plain = processor.pixel_values(images)
    assert len(made) == 2
    first, second = (processor.pixel_values(images + images[:1], cache) for _ in range(2))
    assert len(made) == 4  # red and blue once each; red's second place and the second call hit
    assert first.equal(second) and first[:2].equal(plain) and first[2].equal(plain[0])
    config = processor.config
    bigger = Processor(processor.tokenizer,
                       dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=48)))
    assert bigger.pixel_values(images[:1], cache).shape[-1] == 48 and len(made) == 5  # its own inputs, not 32 px
    assert cache.stats()["inputs_hits"] == 4  # red again in the first call, all three in the second
    tiled = Processor(processor.tokenizer, dataclasses.replace(config, tiles=TileConfig(grid=(2, 2))))
    views = tiled.pixel_values(images, cache)  # the global view and four tiles each: not the plain inputs held
    assert tuple(views.shape[:2]) == (2, 5) and views.equal(tiled.pixel_values(images))
    before = len(made)
    assert tiled.pixel_values(images, cache).equal(views) and len(made) == before


def test_a_server_decodes_each_image_once_across_turns_and_answers_as_without_the_cache(tiny, decodes):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sparkles.generate import Chat
    from sparkles.serve.server import ServeConfig, create_app

    chat = Chat(*tiny)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url("red")}},
                                          {"type": "image_url", "image_url": {"url": url("green")}},
                                          {"type": "text", "text": "Compare IMAGE#1 and IMAGE#2."}]}]

    def replay(mb):
        with TestClient(create_app(chat, ServeConfig(image_cache_mb=mb))) as client:
            decodes.clear()
            messages, answers = list(first), []
            for question in ("And IMAGE#1 alone?", "Which one is brighter?"):
                reply = client.post("/v1/chat/completions", json={"model": "sparkles", "messages": messages,
                                                                  "max_tokens": 6}).json()
                answers.append(reply["choices"][0]["message"]["content"])
                messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": question}]
            return answers, len(decodes), client.get("/health").json()["image_cache"]

    cached, decoded, stats = replay(64)
    plain, decoded_plain, off = replay(0)
    assert cached == plain and off is None
    assert decoded == 2 and decoded_plain == 4  # two turns of the same two images
    assert stats["pixels_hits"] == 2 and stats["inputs_hits"] == 2 and stats["entries"] == 6  # and the features


def test_an_image_shown_after_a_different_start_is_encoded_once_and_answered_as_without_the_cache(tiny,
                                                                                                  monkeypatch):
    """The prefix cache cannot reuse an image whose prompt differs before it; its encoding comes from the image
    cache. Questions before the images, each new: every request misses the prefix."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sparkles.generate import Chat
    from sparkles.serve.server import ServeConfig, create_app

    model, processor = tiny
    encoded, real = [], model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: encoded.append(len(pixels)) or real(pixels))
    images = [{"type": "image_url", "image_url": {"url": url(c)}} for c in ("red", "green")]

    def ask_all(mb):
        encoded.clear()
        with TestClient(create_app(Chat(model, processor), ServeConfig(image_cache_mb=mb))) as client:
            answers = [client.post("/v1/chat/completions", json={"model": "sparkles", "max_tokens": 5, "messages": [
                {"role": "user", "content": [{"type": "text", "text": question}, *images]}]}).json()
                for question in ("First question?", "Another one entirely:", "Third.")]
            return [a["choices"][0]["message"]["content"] for a in answers], list(encoded), \
                client.get("/health").json()
    cached, calls, health = ask_all(64)
    plain, plain_calls, _ = ask_all(0)
    # Without the image cache each request encodes both images: the prefix cache (on in both) never holds them.
    assert cached == plain and calls == [2] and plain_calls == [2, 2, 2]
    assert health["image_cache"]["features_hits"] == 4
