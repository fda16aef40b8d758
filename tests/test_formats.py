"""Reading and writing other formats: exact round trips, the losses each writer reports, and malformed records."""

from __future__ import annotations

import copy
import json
import warnings

import pytest

from sparkles.conversation import Conversation, Image, Message, Text, renumber, to_markup, validate
from sparkles.errors import InputError
from sparkles.formats import (
    FormatLossWarning,
    from_llava,
    from_openai,
    from_placeholder_text,
    from_sparkles_dialogue,
    losses,
    to_llava,
    to_openai,
    to_placeholder_text,
    to_sparkles_dialogue,
)

# Modelled on spec §7.4: SparklesEval, Visual Genome int ids, evaluation_id before dialogue, a judge object.
EVAL = {
    "evaluation_id": 7,
    "dialogue": [
        {"role": "user",
         "content": "When we view IMAGE#2352049<Img><ImageHere></Img> next to IMAGE#2362551<Img><ImageHere></Img>, "
                    "what differences in working style do you see?",
         "images": [{"image_id": 2352049, "caption": "The image shows a busy professional kitchen ..."},
                    {"image_id": 2362551, "caption": "An office desk with a laptop ..."}]},
        {"role": "assistant", "content": "There are indeed some differences. IMAGE#2352049 is hectic ..."},
        {"role": "user",
         "content": "Introducing IMAGE#2386507<Img><ImageHere></Img> into our discussion, which of IMAGE#2352049 "
                    "and IMAGE#2362551 shares its pace?",
         "images": [{"image_id": 2386507, "caption": "A surfer riding a wave ..."}]},
        {"role": "assistant", "content": "Certainly. In IMAGE#2386507 the surfer ..."},
    ],
    "gpt-4": {"A1_C123_scores": [9.0, 9.0, 9.0, 10.0], "A2_C123_scores": [9.0, 9.0, 10.0, 9.0],
              "prompt": "Users will interact with a conversational assistant. ...", "response": "* Evaluating A1"},
}

# Modelled on spec §7.1: SparklesDialogueCC, string ids, dialogue first, then the teacher's raw exchange.
CC = {
    "dialogue": [
        {"role": "user", "content": "Write a short ad for the cafe in IMAGE#3045<Img><ImageHere></Img>.",
         "images": [{"image_id": "3045", "caption": "A cozy cafe with wooden tables ..."}]},
        {"role": "assistant", "content": "Step into the warmth of IMAGE#3045 ..."},
        {"role": "user", "content": "Could the garden in IMAGE#3302<Img><ImageHere></Img> inspire a seasonal menu "
                                    "for IMAGE#3045?",
         "images": [{"image_id": "3302", "caption": "A flower garden in spring ..."}]},
        {"role": "assistant", "content": "Absolutely. The blossoms in IMAGE#3302 ..."},
    ],
    "raw": [{"prompt": "Users will interact with ...", "response": "[[{'role': 'user', ...}]]"}],
}

PNG = ("data:image/png;base64,"
       "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def dumps(x):
    return json.dumps(x, ensure_ascii=False)


def no_warnings(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    assert [str(w.message) for w in caught] == []
    return out


# --- the placeholder form ---------------------------------------------------------------------------------------


def test_placeholder_reads_images_in_order():
    parts = from_placeholder_text("<image>\nCompare with <image>.", [Image(source="a.jpg"), Image(source="b.jpg")])
    assert parts == (Image("1", "a.jpg"), Text("\nCompare with "), Image("2", "b.jpg"), Text("."))
    assert from_placeholder_text("and <image>", offset=2) == (Text("and "), Image("3"))
    assert from_placeholder_text("no images") == (Text("no images"),)


def test_placeholder_round_trip_is_lossless_with_sequential_labels():
    text = "<image> first, then <image>"
    parts = from_placeholder_text(text)
    assert no_warnings(to_placeholder_text, parts) == text
    assert no_warnings(to_placeholder_text, from_placeholder_text("x <image>", offset=3), offset=3) == "x <image>"


def test_placeholder_count_mismatch():
    with pytest.raises(InputError, match="placeholders in the text: 1, images given: 2"):
        from_placeholder_text("<image>", [Image(), Image()])


def test_placeholder_reports_renamed_and_repeated_images():
    parts = (Image("2352049", caption="kitchen"), Text(" and "), Image("2352049"))
    with pytest.warns(FormatLossWarning, match="IMAGE#2352049 will read back as IMAGE#1") as caught:
        assert to_placeholder_text(parts) == "<image> and <image>"
    assert "shown twice" in str(caught[0].message)
    assert "caption" not in str(caught[0].message)  # the images themselves travel beside the text


# --- SparklesDialogue / SparklesEval ----------------------------------------------------------------------------


@pytest.mark.parametrize("record", [EVAL, CC], ids=["eval-vg", "dialogue-cc"])
def test_sparkles_round_trip_is_exact(record):
    original = copy.deepcopy(record)
    conv = from_sparkles_dialogue(record)
    assert record == original  # the reader does not touch its input
    assert no_warnings(to_sparkles_dialogue, conv) == record
    assert dumps(to_sparkles_dialogue(conv)) == dumps(record)


def test_sparkles_reads_slots_ids_captions_and_meta():
    conv = validate(from_sparkles_dialogue(EVAL))
    assert [m.role for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv.labels == ("2352049", "2362551", "2386507")
    first = conv[0].images[0]
    assert first.image_id == 2352049 and first.caption.startswith("The image shows a busy")
    assert conv[2].text == EVAL["dialogue"][2]["content"]
    assert conv.meta["evaluation_id"] == 7 and conv.meta["gpt-4"] == EVAL["gpt-4"]
    cc = from_sparkles_dialogue(CC)
    assert cc.images[1].image_id == "3302" and cc.meta["raw"] == CC["raw"]


def test_sparkles_keeps_message_extras_and_empty_images():
    record = copy.deepcopy(CC)
    record["dialogue"][1]["images"] = []
    record["dialogue"][3]["note"] = {"fixed": True}
    assert dumps(to_sparkles_dialogue(from_sparkles_dialogue(record))) == dumps(record)


def test_sparkles_writer_reports_what_it_drops():
    conv = from_sparkles_dialogue(CC)
    conv = Conversation((Message("system", (Text("Be brief."),)),) + conv.messages, {})
    assert losses(conv, "sparkles") == ["the system message is dropped (SparklesDialogue has no system role)"]
    with pytest.warns(FormatLossWarning, match="to_sparkles_dialogue loses: the system message is dropped"):
        out = to_sparkles_dialogue(conv)
    assert [m["role"] for m in out["dialogue"]] == ["user", "assistant", "user", "assistant"]

    openai = from_openai([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}])
    lost = losses(openai, "sparkles")
    assert lost == ["the image source is dropped (SparklesDialogue holds image ids and captions only)",
                    "IMAGE#1 has no image_id: the label is written as the id"]
    with pytest.raises(InputError, match="to_sparkles_dialogue loses: the image source is dropped"):
        to_sparkles_dialogue(openai, on_loss="error")
    out = no_warnings(to_sparkles_dialogue, openai, on_loss="ignore")
    assert out["dialogue"][0] == {"role": "user", "content": "IMAGE#1<Img><ImageHere></Img>",
                                  "images": [{"image_id": "1"}]}


def _broken(path, value):
    record = copy.deepcopy(EVAL)
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


@pytest.mark.parametrize("record, message", [
    (_broken(["dialogue"], KeyError), "needs a 'dialogue' list of messages"),
    (_broken(["dialogue"], "hi"), "'dialogue' must be a list"),
    (_broken(["dialogue", 1, "role"], "gpt"), "dialogue[1]: role must be 'user' or 'assistant', got 'gpt'"),
    (_broken(["dialogue", 0, "role"], KeyError), "dialogue[0]: missing 'role'"),
    (_broken(["dialogue", 0, "content"], 3), "dialogue[0].content must be a str, got int"),
    (_broken(["dialogue", 2, "images"], []), "dialogue[2]: the content has 1 image slots but 'images' lists 0"),
    (_broken(["dialogue", 0, "images", 1], {"caption": "x"}), "dialogue[0].images[1]: expected {'image_id'"),
    (_broken(["dialogue", 0, "images", 1, "url"], "x"), "dialogue[0].images[1]: unexpected keys ['url']"),
    (_broken(["dialogue", 1, "content"], "See IMAGE#9<Img><ImageHere></Img>"), "dialogue[1]: the content has 1"),
    ([EVAL], "must be a JSON object, got list"),
])
def test_sparkles_malformed_records(record, message):
    with pytest.raises(InputError) as e:
        from_sparkles_dialogue(record)
    assert message in str(e.value)


def test_sparkles_assistant_slot_with_images_is_refused():
    record = _broken(["dialogue", 1], {"role": "assistant", "content": "IMAGE#9<Img><ImageHere></Img>",
                                       "images": [{"image_id": 9, "caption": "x"}]})
    with pytest.raises(InputError, match="dialogue\\[1\\]: only user messages may show images"):
        from_sparkles_dialogue(record)


# --- OpenAI -----------------------------------------------------------------------------------------------------

OPENAI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                 {"type": "image_url", "image_url": {"url": PNG}},
                                 {"type": "text", "text": " with "},
                                 {"type": "image_url", "image_url": {"url": "https://example.org/b.jpg"}}]},
    {"role": "assistant", "content": "IMAGE#1 is a single pixel; IMAGE#2 is a photo."},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/c.jpg"}},
                                 {"type": "text", "text": "Which of IMAGE#1 and IMAGE#2 is closer to this?"}]},
]


def test_openai_round_trip_is_lossless():
    conv = validate(from_openai(OPENAI))
    assert conv.labels == ("1", "2", "3")
    assert [i.source for i in conv.images] == [PNG, "https://example.org/b.jpg", "https://example.org/c.jpg"]
    assert conv[1].text == "Compare IMAGE#1<Img><ImageHere></Img> with IMAGE#2<Img><ImageHere></Img>"
    assert losses(conv, "openai") == []
    assert dumps(no_warnings(to_openai, conv)) == dumps(OPENAI)


def test_openai_accepts_other_spellings():
    conv = from_openai([
        {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "https://x.org/a.png"},
                                     {"type": "input_image", "image_url": "https://x.org/b.png"},
                                     {"type": "text", "text": "Same?"}], "name": "ann"},
        {"role": "assistant", "content": None},
    ])
    assert [m.role for m in conv] == ["system", "user", "assistant"]
    assert conv[2].parts == () and conv.labels == ("1", "2")
    out = no_warnings(to_openai, conv)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1]["name"] == "ann" and out[1]["content"][1] == {"type": "image_url",
                                                              "image_url": {"url": "https://x.org/b.png"}}
    assert out[2] == {"role": "assistant", "content": ""}


def test_openai_writer_needs_urls_and_reports_losses():
    conv = from_sparkles_dialogue(CC)
    with pytest.raises(InputError, match="IMAGE#3045 has no URL"):
        to_openai(conv, on_loss="ignore")
    lost = losses(conv, "openai")
    assert lost[0] == ("IMAGE#3045 will read back as IMAGE#1 (in OpenAI messages images are numbered by position; "
                       "renumber() first to make the text match)")
    assert "2 image captions are dropped (no place in OpenAI messages)" in lost
    assert "2 image ids are dropped (no place in OpenAI messages)" in lost
    assert "record fields raw are dropped (OpenAI messages are a bare list)" in lost
    with pytest.warns(FormatLossWarning, match="to_openai loses: IMAGE#3045"):
        out = to_openai(conv, image_url=lambda image: f"https://img.example/{image.image_id}.jpg")
    assert out[0]["content"] == [
        {"type": "text", "text": "Write a short ad for the cafe in "},  # the name goes with the slot
        {"type": "image_url", "image_url": {"url": "https://img.example/3045.jpg"}},
        {"type": "text", "text": "."}]
    local = Conversation((Message("user", (Image("1", source="photos/a.jpg"),)),))
    with pytest.raises(InputError, match="pass image_url="):
        to_openai(local)
    out = no_warnings(to_openai, local, image_url=lambda image: PNG)
    assert out[0]["content"] == [{"type": "image_url", "image_url": {"url": PNG}}]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "tool", "content": "42", "tool_call_id": "a"}], "messages[0]: role 'tool' is not supported"),
    ([{"role": "user", "content": "hi"}, {"role": "function", "content": "x"}], "messages[1]: role 'function'"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
     "messages[0].content[0]: unknown part type 'input_audio'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]: image_url"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}], "messages[0]: tool_calls is not"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": "https://x.org/a.png"}]}],
     "only user messages may show images"),
    ([{"content": "hi"}], "messages[0]: missing 'role'"),
    ({"role": "user", "content": "hi"}, "must be a list of message objects"),
])
def test_openai_malformed(messages, message):
    with pytest.raises(InputError) as e:
        from_openai(messages)
    assert message in str(e.value)


def test_sparkles_to_openai_and_back_keeps_text_and_image_order():
    conv = renumber(from_sparkles_dialogue(EVAL))
    openai = to_openai(conv, image_url=lambda image: f"https://vg.example/{image.image_id}.jpg", on_loss="ignore")
    back = from_openai(json.loads(json.dumps(openai)))
    assert [m.role for m in back] == [m.role for m in conv]
    assert [to_markup(m.parts) for m in back] == [to_markup(m.parts) for m in conv]
    assert back[2].text.startswith("Introducing IMAGE#3<Img><ImageHere></Img> into our discussion, which of IMAGE#1")
    assert [i.source for i in back.images] == [f"https://vg.example/{i}.jpg" for i in (2352049, 2362551, 2386507)]


# --- LLaVA ------------------------------------------------------------------------------------------------------

LLAVA = {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
    {"from": "gpt", "value": "The bus in the image is white and red."},
    {"from": "human", "value": "What feature can be seen on the back of the bus?"},
    {"from": "gpt", "value": "The back of the bus features an advertisement."}]}

LLAVA_MULTI = {"id": "m1", "image": ["a.jpg", "b.jpg", "c.jpg"], "conversations": [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nWhich is older?"},
    {"from": "gpt", "value": "IMAGE#2."},
    {"from": "human", "value": "And <image>?"},
    {"from": "gpt", "value": "Newer than both."}], "source": "synthetic"}


@pytest.mark.parametrize("record", [LLAVA, LLAVA_MULTI], ids=["one-image", "three-images"])
def test_llava_round_trip_is_exact(record):
    conv = validate(from_llava(record))
    assert [i.source for i in conv.images] == ([record["image"]] if isinstance(record["image"], str)
                                                else record["image"])
    assert dumps(no_warnings(to_llava, conv)) == dumps(record)


def test_llava_binds_images_across_turns():
    conv = from_llava(LLAVA_MULTI)
    assert conv.meta == {"id": "m1", "source": "synthetic"}
    assert conv[1].images == (Image("1", "a.jpg"), Image("2", "b.jpg"))
    assert conv[3].parts == (Text("And "), Image("3", "c.jpg"), Text("?"))


def test_llava_without_image_tokens_shows_images_first():
    record = {"id": 5, "image": ["a.jpg", "b.jpg"],
              "conversations": [{"from": "human", "value": "Which is brighter?"}, {"from": "gpt", "value": "A."}]}
    conv = from_llava(record)
    assert conv[0].parts == (Image("1", "a.jpg"), Image("2", "b.jpg"), Text("Which is brighter?"))
    assert to_llava(conv)["conversations"][0]["value"] == "<image><image>Which is brighter?"
    no_image = {"id": 6, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert dumps(to_llava(from_llava(no_image))) == dumps(no_image)


def test_llava_key_order_and_turn_extras_survive():
    record = {"conversations": [{"from": "human", "value": "<image> hi", "weight": 0.0},
                                {"from": "gpt", "value": "hello"}], "image": "a.jpg", "id": "x"}
    assert dumps(to_llava(from_llava(record))) == dumps(record)


def test_llava_writer_paths_and_losses():
    conv = from_sparkles_dialogue(CC)
    with pytest.raises(InputError, match="IMAGE#3045 has no path"):
        to_llava(conv, on_loss="ignore")
    with pytest.warns(FormatLossWarning) as caught:
        out = to_llava(conv, image_path=lambda image: f"images/{image.image_id}.jpg")
    text = str(caught[0].message)
    assert text.startswith("to_llava loses: IMAGE#3045 will read back as IMAGE#1")
    assert "2 image captions are dropped" in text and "raw" not in text  # LLaVA records keep other fields
    assert out["image"] == ["images/3045.jpg", "images/3302.jpg"]
    assert out["conversations"][2] == {"from": "human",
                                       "value": "Could the garden in <image> inspire a seasonal menu for IMAGE#3045?"}
    assert list(out) == ["image", "conversations", "raw"]
    assert losses(from_llava(out), "sparkles") == [
        "2 image sources are dropped (SparklesDialogue holds image ids and captions only)",
        "IMAGE#1, IMAGE#2 have no image_id: the label is written as the id"]
    renamed = to_llava(renumber(conv), image_path=lambda image: f"{image.image_id}.jpg", on_loss="ignore")
    assert renamed["conversations"][2]["value"] == "Could the garden in <image> inspire a seasonal menu for IMAGE#1?"
    with pytest.raises(InputError, match="to_llava loses: .*image captions"):
        to_llava(renumber(conv), image_path=str, on_loss="error")


@pytest.mark.parametrize("record, message", [
    ({"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image> two?"}]},
     "2 <image> tokens but 1 images"),
    ({"id": 1, "conversations": [{"from": "human", "value": "<image> where?"}]}, "1 <image> tokens but 0 images"),
    ({"id": 1, "image": "a.jpg", "conversations": [{"from": "user", "value": "<image>"}]},
     "conversations[0]: 'from' must be human, gpt or system, got 'user'"),
    ({"id": 1, "image": "a.jpg",
      "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}]},
     "conversations[1]: only human turns may show images"),
    ({"id": 1, "image": ["a.jpg"], "conversations": [{"from": "gpt", "value": "x"}]}, "no human turn"),
    ({"id": 1, "image": 3, "conversations": []}, "'image' must be a path or a list of paths"),
    ({"id": 1}, "needs a 'conversations' list"),
    ({"id": 1, "conversations": [{"from": "human"}]}, "conversations[0]: missing 'value'"),
])
def test_llava_malformed(record, message):
    with pytest.raises(InputError) as e:
        from_llava(record)
    assert message in str(e.value)


# --- losses and the dispatcher ----------------------------------------------------------------------------------


def test_losses_per_format():
    conv = from_sparkles_dialogue(EVAL)
    assert losses(conv, "sparkles") == []
    assert losses(conv, "placeholder") == [f"IMAGE#{i} will read back as IMAGE#{k} (in the placeholder form images "
                                           "are numbered by position; renumber() first to make the text match)"
                                           for k, i in enumerate((2352049, 2362551, 2386507), start=1)]
    assert losses(renumber(conv), "placeholder") == []
    plain = Conversation((Message("user", (Image("1", source="https://x.org/a.png"), Text("hi"))),))
    assert all(losses(plain, fmt) == [] for fmt in ("placeholder", "openai", "llava"))
    with pytest.raises(InputError, match="unknown format 'html'"):
        losses(conv, "html")


def test_on_loss_must_be_known():
    with pytest.raises(InputError, match="on_loss must be"):
        to_llava(from_llava(LLAVA), on_loss="quiet")

