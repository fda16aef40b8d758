"""The web UI's limits and its examples: uploads over the size limit refused with a clear message, uploaded files
deleted on undo, reset and disconnect (never the examples'), the server's checks on every turn, and a row of
shapes-world examples that rebuild the world's own first turn and get the model's own answer."""

import random
from pathlib import Path

import pytest
from PIL import Image as PILImage

from sparkles.config import SamplingParams
from sparkles.conversation import Conversation
from sparkles.errors import SparklesError
from sparkles.generate import Chat
from sparkles.serve import webui
from sparkles.serve.requests import ApiError
from sparkles.serve.webui import EXAMPLE_SEEDS, Uploads, add_answer, add_user_turn, check_turn, make_examples
from sparkles.world.tasks import make_caption, make_dialogue


@pytest.fixture
def uploads(tmp_path):
    """Three uploaded pictures in a folder that stands for gradio's upload folder."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    paths = []
    for color in ("red", "blue", "green"):
        PILImage.new("RGB", (40, 30), color).save(folder / f"{color}.png")
        paths.append(str(folder / f"{color}.png"))
    return folder, paths


def test_an_upload_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (3 * 2**20))  # not even an image: the size alone refuses it
    with pytest.raises(SparklesError, match=r"huge.png is 3.0 MB; this page takes images of at most 2 MB each"):
        add_user_turn(Conversation(), "What is IMAGE#1?", [str(big)], max_bytes=2 * 2**20)


def test_a_turn_gets_the_servers_checks(tiny, uploads):
    _, paths = uploads
    asked = add_user_turn(Conversation(), "What is IMAGE#1? " * 10, paths[:1])  # the first IMAGE#1 is its slot
    check_turn(asked, 10_000)
    with pytest.raises(ApiError, match="the messages hold 163 characters of text, more than the 100 that can fit"):
        check_turn(asked, 100)
    with pytest.raises(ApiError, match="must end with a user message"):
        check_turn(add_answer(asked, "red"), 10_000)


def test_the_page_refuses_text_that_cannot_fit(tiny):
    gr = pytest.importorskip("gradio", reason="the web UI needs the [web] extra")
    from sparkles.serve.webui import _responder

    respond = _responder(gr, Chat(*tiny), SamplingParams(max_new_tokens=4), max_text_chars=50)
    with pytest.raises(gr.Error, match="more than the 50 that can fit"):
        list(respond({"text": "x" * 51, "files": []}, Conversation(), None, 0, 1, 4))


def test_uploads_are_deleted_once_no_dialogue_shows_them(uploads, tmp_path):
    folder, paths = uploads
    outside = tmp_path / "mine.png"
    PILImage.new("RGB", (8, 8)).save(outside)
    one = add_answer(add_user_turn(Conversation(), "IMAGE#1?", paths[:1]), "red")
    two = add_user_turn(one, "And IMAGE#2 and IMAGE#3?", paths[1:])
    other = add_user_turn(Conversation(), "IMAGE#1?", paths[2:])  # another visitor, the same bytes: the same path
    shown = Uploads(folder)
    for conversation in (two, other):
        for message in conversation:
            shown.hold(message.images)
    assert shown.drop(two, keep=webui.undo_turn(two)) == [str(Path(paths[1]).resolve())]  # undo
    assert [Path(p).exists() for p in paths] == [True, False, True]  # the other visitor still shows the third
    assert shown.drop(other) == [str(Path(paths[2]).resolve())]
    example = add_user_turn(one, "And IMAGE#2?", [str(outside)])
    spared = Uploads(folder, spare=frozenset({one.images[0].sha256}))
    spared.hold(example.images)
    assert spared.drop(example) == [] and Path(paths[0]).exists() and outside.exists()  # an example's, and not ours
    shown.drop(one)
    assert not Path(paths[0]).exists() and outside.exists() and not shown.shown


def test_examples_rebuild_the_worlds_first_turns(tmp_path):
    examples = make_examples(tmp_path)
    assert len(examples) == len(EXAMPLE_SEEDS) == 3
    for i, (seed, example) in enumerate(zip(EXAMPLE_SEEDS, examples)):
        item = make_caption(random.Random(seed), images=2) if i == 2 else make_dialogue(random.Random(seed))
        turn = add_user_turn(Conversation(), example["text"], example["files"]).messages[0]
        world = item.turns[0]
        assert [type(p).__name__ for p in turn.parts] == [type(p).__name__ for p in world.parts]
        assert turn.text == world.text
        assert [im.name for im in turn.images] == [im.name for im in world.images]
        assert [im.pixels.tobytes() for im in turn.images] == [im.pixels.convert("RGB").tobytes()
                                                               for im in world.images]
    assert examples == make_examples(tmp_path)  # the same at every start


@pytest.fixture
def demo(tiny, tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason="the web UI needs the [web] extra")
    from sparkles.serve.webui import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # gradio's upload folder, for this test only
    return build_demo(Chat(*tiny), SamplingParams(max_new_tokens=5))


def _handlers(demo, name):
    return [f for f in demo.fns.values() if getattr(f.fn, "__name__", None) == name]


def test_the_page_shows_examples_and_a_click_asks_one_in_a_new_chat(demo, tiny):
    import gradio as gr

    datasets = [b for b in demo.blocks.values() if isinstance(b, gr.Dataset)]
    assert len(datasets) == 1 and len(datasets[0].samples) == len(EXAMPLE_SEEDS)
    click, = _handlers(demo, "load_example")
    reset = next(f for f in _handlers(demo, "reset") if f.trigger_after == list(demo.fns).index(
        next(k for k, f in demo.fns.items() if f is click)))
    respond = next(f for f in _handlers(demo, "respond") if f.trigger_after is not None)
    assert respond.trigger_after == next(k for k, f in demo.fns.items() if f is reset)  # click, reset, then answer
    example = datasets[0].samples[0][0]
    files = [f["path"] for f in example["files"]]
    assert all(PILImage.open(f).size == (64, 64) for f in files)  # gradio's own copies, served from its folder
    updates = list(respond.fn({"text": example["text"], "files": files}, Conversation(), None, 0, 1, 5))
    conversation = updates[-1][1]
    asked = Conversation(conversation.messages[:1])
    assert conversation.messages[-1].text == Chat(*tiny).answer(asked, SamplingParams(max_new_tokens=5))


def test_reset_undo_and_leaving_delete_uploads_but_never_an_examples(demo, tmp_path):
    import gradio as gr

    folder = Path(tmp_path / "uploads")
    pictures = []
    for color in ("red", "blue"):
        PILImage.new("RGB", (40, 30), color).save(folder / f"{color}.png")
        pictures.append(str(folder / f"{color}.png"))
    example = next(b for b in demo.blocks.values() if isinstance(b, gr.Dataset)).samples[0][0]
    example_file = example["files"][0]["path"]
    one = add_answer(add_user_turn(Conversation(), "IMAGE#1 and IMAGE#2?", [pictures[0], example_file]), "ok")
    two = add_user_turn(one, "And IMAGE#3?", pictures[1:])
    undo, = _handlers(demo, "undo")
    assert undo.fn(two)[1] == one and not Path(pictures[1]).exists() and Path(pictures[0]).exists()
    reset = _handlers(demo, "reset")[0]
    assert reset.fn(one, None)[1] == Conversation()
    assert not Path(pictures[0]).exists() and Path(example_file).exists()
    PILImage.new("RGB", (40, 30), "red").save(pictures[0])
    state = next(b for b in demo.blocks.values() if isinstance(b, gr.State) and isinstance(b.value, Conversation))
    state.delete_callback(one)  # what gradio calls when the browser leaves
    assert not Path(pictures[0]).exists() and Path(example_file).exists()
