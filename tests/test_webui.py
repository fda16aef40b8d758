"""The web UI: turns with images named IMAGE#k, undo, reset, SparklesDialogue export, and a real browser (headless
Debian Chromium through Playwright) uploading two images and reading the streamed answer, with no outside request."""

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage

from sparkles.config import SamplingParams
from sparkles.errors import SparklesError
from sparkles.formats import from_sparkles_dialogue
from sparkles.generate import Chat
from sparkles.serve.webui import add_answer, add_user_turn, chat_messages, export_dialogue, gallery_items, undo_turn

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for color in ("red", "blue", "green"):
        path = tmp_path / f"{color}.png"
        PILImage.new("RGB", (48, 32), color).save(path)
        paths.append(str(path))
    return paths


def test_images_are_named_across_turns_and_shown_with_their_names(pictures):
    from sparkles.conversation import Conversation

    first = add_user_turn(Conversation(), "What differs between IMAGE#1 and IMAGE#2?", pictures[:2])
    dialogue = add_answer(first, " The colour. ")
    second = add_user_turn(dialogue, "Is IMAGE#3 closer to IMAGE#1?", pictures[2:])
    assert second.labels == ("1", "2", "3")
    shown = chat_messages(second)
    assert [m["role"] for m in shown] == ["user", "assistant", "user"]
    assert shown[0]["content"][0] == "What differs between IMAGE#1"  # the label stands where the image does
    assert shown[0]["content"][1] == {"path": pictures[0], "alt_text": "IMAGE#1"}
    assert shown[1]["content"] == ["The colour."]
    assert gallery_items(second) == [(p, f"IMAGE#{i}") for i, p in enumerate(pictures, start=1)]
    with pytest.raises(SparklesError, match="IMAGE#4"):
        add_user_turn(add_answer(second, "yes"), "and IMAGE#4?", [])
    with pytest.raises(SparklesError, match="no answer yet"):
        add_user_turn(second, "again", [])
    with pytest.raises(SparklesError, match="type a message"):
        add_user_turn(dialogue, "  ", [])


def test_undo_drops_the_last_turn_with_its_images(pictures):
    from sparkles.conversation import Conversation

    one = add_answer(add_user_turn(Conversation(), "IMAGE#1?", pictures[:1]), "red")
    two = add_answer(add_user_turn(one, "And IMAGE#2?", pictures[1:2]), "blue")
    assert undo_turn(two) == one and undo_turn(one).messages == ()
    pending = add_user_turn(one, "And IMAGE#2?", pictures[1:2])
    assert undo_turn(pending) == one and undo_turn(undo_turn(undo_turn(one))).messages == ()
    again = add_user_turn(undo_turn(two), "Now IMAGE#2", pictures[2:])  # the freed name is given again
    assert gallery_items(again)[-1] == (pictures[2], "IMAGE#2")


def test_export_is_a_sparkles_dialogue_that_reads_back(pictures, tmp_path):
    from sparkles.conversation import Conversation

    dialogue = add_answer(add_user_turn(Conversation(), "Compare IMAGE#1 and IMAGE#2.", pictures[:2]), "Done.")
    path = export_dialogue(dialogue, tmp_path)
    record = json.loads(path.read_text())
    slot = "<Img><ImageHere></Img>"
    assert record["dialogue"][0]["content"] == f"Compare IMAGE#1{slot} and IMAGE#2{slot}."
    assert record["dialogue"][0]["images"] == [{"image_id": "red.png"}, {"image_id": "blue.png"}]
    assert record["dialogue"][1] == {"role": "assistant", "content": "Done."}
    back = from_sparkles_dialogue(record)
    assert back.labels == ("1", "2") and [m.role for m in back] == ["user", "assistant"]


def test_the_page_handler_streams_and_reports_user_errors(tiny, pictures):
    gr = pytest.importorskip("gradio", reason="the web UI needs the [web] extra, which .ci/run installs")
    from sparkles.conversation import Conversation
    from sparkles.serve.webui import _responder

    respond = _responder(gr, Chat(*tiny), SamplingParams(max_new_tokens=8))
    updates = list(respond({"text": "What is IMAGE#1?", "files": pictures[:1]}, Conversation(), None, 0, 1, 8))
    assert len(updates) >= 3  # the question first, then the answer as it grows, then the final state
    shown, conversation, session, box, gallery = updates[-1]
    assert box is None and [m.role for m in conversation] == ["user", "assistant"]
    assert shown == chat_messages(conversation) and shown[-1]["role"] == "assistant"
    assert gallery == [(pictures[0], "IMAGE#1")]
    assert session.conversation == conversation  # this browser's session now holds the dialogue's cache
    with pytest.raises(gr.Error, match="IMAGE#2"):
        list(respond({"text": "And IMAGE#2?", "files": []}, conversation, session, 0, 1, 8))


def test_each_browser_session_reuses_its_cache_and_follows_the_pages_undo(tiny, pictures):
    gr = pytest.importorskip("gradio", reason="the web UI needs the [web] extra, which .ci/run installs")
    from sparkles.conversation import Conversation
    from sparkles.serve.webui import _free, _responder

    model, processor = tiny
    chat = Chat(model, processor)
    encoded = []
    model.vision.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    respond = _responder(gr, chat, SamplingParams(max_new_tokens=6))

    def turn(text, files, conversation, session):
        return list(respond({"text": text, "files": files}, conversation, session, 0, 1, 6))[-1][1:3]

    one, session = turn("What is IMAGE#1?", pictures[:1], Conversation(), None)
    two, same = turn("And IMAGE#2 with IMAGE#1?", pictures[1:2], one, session)
    assert same is session and encoded == [1, 1] and session.stats["tokens_reused"] > 0
    # The page undoes turn two and asks something else: the session follows, nothing is encoded again, and the
    # answer is the one a fresh Chat gives.
    three, _ = turn("Is IMAGE#1 red?", [], undo_turn(two), session)
    assert encoded == [1, 1] and three.messages[:2] == one.messages
    assert three.messages[-1].text == chat.answer(Conversation(three.messages[:-1]), SamplingParams(max_new_tokens=6))
    _free(session)
    assert session.cache.length == 0 and session.turns == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium); "
                    ".ci/run installs it for this browser test")
def test_a_browser_uploads_two_images_and_reads_the_answer(tiny, pictures, tmp_path):
    pytest.importorskip("gradio")
    playwright = pytest.importorskip("playwright.sync_api")
    from sparkles.engine import Engine
    from sparkles.serve.webui import build_demo

    engine = Engine.from_chat(Chat(*tiny))  # as `sparkles web` runs it: visitors' answers are batched
    demo = build_demo(engine, SamplingParams(max_new_tokens=12), concurrency=4)
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    outside: list[str] = []
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])
            page = browser.new_page()
            local = ("http://127.0.0.1", "data:", "blob:")
            # Every request must stay on this machine: record and refuse any other.
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local)
                       else (outside.append(route.request.url), route.abort()))
            page.goto(f"http://127.0.0.1:{port}/", timeout=30_000)
            page.locator("#mmbox input[type=file]").set_input_files(pictures[:2])
            page.wait_for_function("document.querySelectorAll('#mmbox img').length >= 2", timeout=30_000)
            page.locator("#mmbox textarea").fill("What differs between IMAGE#1 and IMAGE#2?")
            page.locator("#mmbox textarea").press("Enter")
            page.wait_for_function("document.querySelectorAll('#chatbot img').length >= 2", timeout=30_000)
            page.wait_for_function("document.querySelector('#gallery').innerText.includes('IMAGE#2')", timeout=30_000)
            answer = _settled_answer(page)
            text = page.locator("#chatbot").inner_text()
            page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)
            page.locator("#undo").click()
            page.wait_for_function("document.querySelectorAll('#chatbot img').length == 0", timeout=30_000)
            browser.close()
    finally:
        demo.close()
        engine.close()
    assert "What differs between IMAGE#1" in text and "IMAGE#2" in text and answer.strip() in text
    assert outside == [] and Path(tmp_path / "webui.png").stat().st_size > 0


def _settled_answer(page, seconds: float = 30.0) -> str:
    """The bot's answer once it has text and has stopped growing for a second (streaming is over)."""
    script = "(document.querySelector('#chatbot .bot-row') || {innerText: ''}).innerText"
    deadline, last, since = time.monotonic() + seconds, None, time.monotonic()
    while time.monotonic() < deadline:
        now = page.evaluate(script)
        if now != last:
            last, since = now, time.monotonic()
        elif now.strip() and time.monotonic() - since > 1.0:
            return now
        time.sleep(0.1)
    raise AssertionError(f"no settled answer in {seconds} s (last seen: {last!r})")
