"""Conversations: where images are placed, how they are named, and which references are allowed."""

import subprocess
import sys

import pytest

from sparkles.conversation import (
    Conversation,
    Image,
    Message,
    Text,
    parse_markup,
    renumber,
    to_markup,
    user_message,
    validate,
)
from sparkles.errors import InputError


def test_placeholders_place_new_images_in_order():
    m = user_message("Compare <image> with <image>.", [Image(source="a"), Image(source="b")])
    assert m.parts == (Text("Compare "), Image("1", "a"), Text(" with "), Image("2", "b"), Text("."))


def test_the_first_mention_of_a_new_image_becomes_its_slot():
    m = user_message("Is IMAGE#2 brighter than IMAGE#1? IMAGE#2 looks dark.", [Image(source="a"), Image(source="b")])
    assert m.parts == (Text("Is "), Image("2", "b"), Text(" brighter than "), Image("1", "a"),
                       Text("? IMAGE#2 looks dark."))
    assert m.text == ("Is IMAGE#2<Img><ImageHere></Img> brighter than IMAGE#1<Img><ImageHere></Img>? "
                      "IMAGE#2 looks dark.")


def test_images_neither_placed_nor_named_go_first():
    m = user_message("What do you see?", [Image(source="a"), Image(source="b")])
    assert m.parts == (Image("1", "a"), Text(" "), Image("2", "b"), Text(" "), Text("What do you see?"))
    assert user_message("", [Image(source="a")]).parts == (Image("1", "a"),)


def test_later_turns_continue_the_numbering_and_may_refer_back():
    m = user_message("Does <image> match IMAGE#1?", [Image(source="c")], known=["1", "2"])
    assert m.parts == (Text("Does "), Image("3", "c"), Text(" match IMAGE#1?"))


def test_unknown_references_and_placeholder_counts_are_errors():
    with pytest.raises(InputError, match=r"IMAGE#3 is not an image of this conversation \(images: IMAGE#1, IMAGE#2\)"):
        user_message("IMAGE#3?", [Image(source="a")], known=["1"])
    with pytest.raises(InputError, match="2 <image> placeholders but 1 new images"):
        user_message("<image> <image>", [Image(source="a")])


def test_markup_round_trip_keeps_labels_and_bare_slots():
    text = "IMAGE#2330601<Img><ImageHere></Img> and <Img><ImageHere></Img> Describe this image."
    parts = parse_markup(text)
    assert [p.label for p in parts if isinstance(p, Image)] == ["2330601", None]
    assert to_markup(parts) == text
    with pytest.raises(InputError, match="image slots in the text: 2, images given: 1"):
        parse_markup(text, [Image()])


def conversation(*messages):
    return Conversation(tuple(messages))


def test_validate_role_order_and_image_places():
    hi = Message.text_only("user", "hi")
    ok = Message.text_only("assistant", "hello")
    validate(conversation(Message.text_only("system", "s"), hi, ok, hi))
    with pytest.raises(InputError, match="message 1: expected a assistant message, got 'user'"):
        validate(conversation(hi, hi))
    with pytest.raises(InputError, match="message 0: expected a user message, got 'assistant'"):
        validate(conversation(ok))
    with pytest.raises(InputError, match="only user messages may hold images"):
        validate(conversation(hi, Message("assistant", (Image("1"),))))
    with pytest.raises(InputError, match="must end with an assistant message"):
        validate(conversation(hi), allow_open=False)
    with pytest.raises(InputError, match="no messages"):
        validate(conversation())


def test_validate_refuses_a_reference_before_the_image_is_shown():
    first = Message("user", parse_markup("Look at IMAGE#2 and IMAGE#1<Img><ImageHere></Img>"))
    with pytest.raises(InputError, match="message 0: IMAGE#2 is not an image"):
        validate(conversation(first))
    with pytest.raises(InputError, match="IMAGE#2043 is not an image of this conversation"):
        validate(conversation(Message.text_only("user", "Write a dialogue about IMAGE#2043.")))
    shown = Message("user", parse_markup("IMAGE#1<Img><ImageHere></Img> then IMAGE#1 again"))
    validate(conversation(shown))


def test_renumber_names_images_by_first_appearance_everywhere():
    first = Message("user", parse_markup("IMAGE#812<Img><ImageHere></Img> vs IMAGE#77<Img><ImageHere></Img>?"))
    answer = Message.text_only("assistant", "IMAGE#77 is louder than IMAGE#812.")
    second = Message("user", parse_markup("And IMAGE#5120<Img><ImageHere></Img> with IMAGE#77?"))
    out = renumber(conversation(first, answer, second))
    assert [m.text for m in out] == ["IMAGE#1<Img><ImageHere></Img> vs IMAGE#2<Img><ImageHere></Img>?",
                                     "IMAGE#2 is louder than IMAGE#1.",
                                     "And IMAGE#3<Img><ImageHere></Img> with IMAGE#2?"]
    assert out.labels == ("1", "2", "3")


def test_a_relabelled_slot_shown_twice_is_one_image():
    shown = Message("user", parse_markup("IMAGE#1<Img><ImageHere></Img> IMAGE#1<Img><ImageHere></Img>"))
    c = conversation(shown)
    assert len(c.slots) == 2 and len(c.images) == 1


def test_conversations_import_without_torch():
    code = ("import sys, sparkles, sparkles.conversation, sparkles.formats, sparkles.image; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
