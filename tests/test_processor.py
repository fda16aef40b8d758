"""The renderer: golden ids and loss mask, the original's exact prompt strings, prefix stability, limits."""

import dataclasses

import pytest
from conftest import CHATML, solid, tiny_config

from sparkles.config import SPARKLESCHAT_SYSTEM
from sparkles.conversation import Conversation, Message, Text, parse_markup, user_message
from sparkles.errors import ContextLengthError, InputError
from sparkles.processor import IGNORE, Processor, TextStream
from sparkles.template import SparklesTemplate
from sparkles.tokenizer import byte_tokenizer


def processor(**changes) -> Processor:
    config = tiny_config(**changes)
    return Processor(byte_tokenizer((config.image_token,)), config)


def two_turns() -> Conversation:
    """2 turns, 3 images: two in turn 1, a new one in turn 2 that is compared with IMAGE#1."""
    first = user_message("Compare IMAGE#1 with IMAGE#2.", [solid("red"), solid("blue")])
    second = user_message("Is <image> like IMAGE#1?", [solid("green")], known=["1", "2"])
    return Conversation((first, Message.text_only("assistant", "Red, then blue."), second,
                         Message.text_only("assistant", "No.")))


def test_golden_rendering_of_two_turns_and_three_images():
    p = processor()
    r = p.render(two_turns())
    assert p.visualize(r) == (
        "<s>Human: Compare IMAGE#1<Img>⟨image 1 × 4 at 28⟩</Img> with IMAGE#2<Img>⟨image 2 × 4 at 56⟩</Img>.###"
        "Assistant:⟦ Red, then blue.###⟧Human: Is IMAGE#3<Img>⟨image 3 × 4 at 121⟩</Img> like IMAGE#1?###"
        "Assistant:⟦ No.###⟧")
    assert r.image_starts == [28, 56, 121]
    assert len(r) == 165
    assert r.input_ids[0] == p.tokenizer.bos_token_id
    for start in r.image_starts:
        assert r.input_ids[start:start + 4] == [p.image_token_id] * 4
        assert r.labels[start:start + 4] == [IGNORE] * 4
    supervised = [i for i, label in enumerate(r.labels) if label != IGNORE]
    assert p.tokenizer.decode([r.input_ids[i] for i in supervised]) == " Red, then blue.### No.###"
    assert all(r.labels[i] == r.input_ids[i] for i in supervised)


def test_loss_on_last_answer_only_and_on_none():
    p = processor()
    last = p.render(two_turns(), loss_on="last")
    assert p.tokenizer.decode([t for t in last.labels if t != IGNORE]) == " No.###"
    none = p.render(two_turns(), loss_on="none")
    assert set(none.labels) == {IGNORE}


def test_generation_prompt_matches_the_original_inference_string():
    """Spec §4.1: system + '###', 'Human: ' + text + '###', then the open 'Assistant:' with no trailing space."""
    conversation = Conversation((Message("user", parse_markup(
        "Compare IMAGE#1<Img><ImageHere></Img> with IMAGE#2<Img><ImageHere></Img>.")),))
    pieces = SparklesTemplate(system=SPARKLESCHAT_SYSTEM).render(conversation, generation=True)
    text = "".join("<ImageHere>" if p.slot is not None else p.text for p in pieces)
    assert text == ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
                    "provide it to you. Please answer my questions.###Human: Compare IMAGE#1<Img><ImageHere></Img> "
                    "with IMAGE#2<Img><ImageHere></Img>.###Assistant:")


@pytest.mark.parametrize("template", ["sparkles", "chat_template"])
def test_a_longer_conversation_renders_as_the_shorter_one_plus_a_suffix(template):
    """What a chat session relies on to keep its KV cache: earlier turns never re-render differently."""
    tok = byte_tokenizer(("<image>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = CHATML
    p = Processor(tok, tiny_config(template=template, system_prompt="Look closely."))
    full = two_turns()
    history = p.render(Conversation(full.messages[:2]), loss_on="none")
    whole = p.render(full, loss_on="none")
    assert whole.input_ids[:len(history)] == history.input_ids
    assert len(whole) > len(history)


def test_user_text_cannot_smuggle_image_tokens():
    p = processor()
    conversation = Conversation((Message.text_only("user", "what is <image> here"),))
    r = p.render(conversation, generation=True)
    assert p.image_token_id not in r.input_ids
    assert "<image>" in p.tokenizer.decode(r.input_ids)


def test_too_long_and_too_many_images_are_input_errors():
    p = processor(max_seq_len=60)
    with pytest.raises(ContextLengthError, match="tokens long, more than the 59"):
        p.render(Conversation((Message.text_only("user", "x" * 100),)), generation=True)
    p = processor(max_images=2)
    with pytest.raises(InputError, match="too many images: 3"):
        p.render(two_turns())


def test_images_need_pixels_before_encoding():
    p = processor()
    conversation = Conversation((Message("user", parse_markup("IMAGE#1<Img><ImageHere></Img>")),))
    with pytest.raises(InputError, match="images without pixels: IMAGE#1"):
        p.encode(conversation)


def test_pixel_values_are_squashed_and_normalised():
    p = processor()
    encoded = p.encode(two_turns())
    assert tuple(encoded.pixel_values.shape) == (3, 3, 32, 32)
    red = encoded.pixel_values[0]
    assert red[0].mean() > 1.5 and red[2].mean() < -1.0  # red channel high, blue low after CLIP normalisation


def test_chat_template_rendering_supervises_answers_and_their_turn_end():
    tok = byte_tokenizer(("<image>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = CHATML
    config = dataclasses.replace(tiny_config(), template="chat_template", system_prompt="Be brief.")
    p = Processor(tok, config)
    r = p.render(two_turns())
    view = p.visualize(r)
    assert view.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare IMAGE#1⟨image 1 × 4")
    assert "<|im_start|>assistant\n⟦Red, then blue.<|im_end|>⟧\n<|im_start|>user\nIs IMAGE#3⟨image 3" in view
    assert view.endswith("⟦No.<|im_end|>⟧\n")
    assert p.stop_ids == tuple(sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}))
    prompt = p.render(Conversation(two_turns().messages[:1]), generation=True)
    assert p.tokenizer.decode(prompt.input_ids[-12:]).endswith("<|im_start|>assistant\n")


def test_text_stream_never_splits_a_character_and_holds_back_stop_strings():
    tok = byte_tokenizer()
    ids = tok("é ok#", add_special_tokens=False)["input_ids"] + tok("## tail", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=("###",))
    shown = [stream.push(i) for i in ids]
    assert shown[0] == ""  # first byte of a two-byte character: nothing to show yet
    assert "".join(shown) == "é ok"
    assert stream.stopped and stream.text == "é ok"
    plain = TextStream(tok, stop=("###",))
    out = [plain.push(i) for i in tok("a#b", add_special_tokens=False)["input_ids"]]
    assert out == ["a", "", "#b"] and not plain.stopped


def test_assistant_messages_cannot_hold_images():
    p = processor()
    bad = Conversation((Message.text_only("user", "hi"), Message("assistant", (Text("see"), solid("red")))))
    with pytest.raises(InputError, match="only user messages may hold images"):
        p.render(bad)
