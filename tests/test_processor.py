"""The renderer: golden ids and loss mask, the original's exact prompt strings, prefix stability, limits."""

import dataclasses
import io
import json
import re

import pytest
from conftest import CHATML, solid, tiny_config
from PIL import Image as PILImage

from sparkles.config import SPARKLESCHAT_SYSTEM, DataSource
from sparkles.conversation import Conversation, Message, Text, parse_markup, user_message
from sparkles.errors import ContextLengthError, InputError
from sparkles.processor import IGNORE, Processor, TextStream
from sparkles.template import SparklesTemplate
from sparkles.tokenizer import byte_tokenizer
from sparkles.train.recipes import PRESETS
from sparkles.train.records import read_source


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
    # No system prompt, and still the leading "###": the original's training text (spec §4.2).
    assert p.visualize(r) == (
        "<s>###Human: Compare IMAGE#1<Img>⟨image 1 × 4 at 31⟩</Img> with IMAGE#2<Img>⟨image 2 × 4 at 59⟩</Img>.###"
        "Assistant:⟦ Red, then blue.###⟧Human: Is IMAGE#3<Img>⟨image 3 × 4 at 124⟩</Img> like IMAGE#1?###"
        "Assistant:⟦ No.###⟧")
    assert r.image_starts == [31, 59, 124]
    assert len(r) == 168
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


# The paper's recipe trains on the paper's text (spec §3.8, §4.2, §4.4, §6.4).

SLOTS = re.compile("⟨image \\d+ × 32 at \\d+⟩")
Q1 = ("Can you link the celebration occurring in IMAGE#2331159<Img><ImageHere></Img> and the dirt bike race in "
      "IMAGE#2330601<Img><ImageHere></Img>?")
A1 = "Certainly, in IMAGE#2331159 people celebrate."
Q2 = "How would you incorporate the train scene from IMAGE#2408549<Img><ImageHere></Img> into the story?"
A2 = "In IMAGE#2408549, we witness a train arriving."


def turn_two_record(tmp_path):
    """A record of the original's per-turn training files (spec §7.2), with its images on disk."""
    (tmp_path / "images").mkdir()
    for image_id in (2331159, 2330601, 2408549):
        PILImage.new("RGB", (8, 8), "red").save(tmp_path / "images" / f"{image_id}.jpg")
    record = {"instruction": f"###Human: {Q1}###Assistant: {A1}###Human: {Q2}###Assistant: ", "answer": A2,
              "tgt_imgs": [{"image_id": 2331159}, {"image_id": 2330601}, {"image_id": 2408549}]}
    (tmp_path / "turns.jsonl").write_text(json.dumps(record) + "\n")
    samples, _ = read_source(DataSource(str(tmp_path / "turns.jsonl"), kind="sparkles_turns",
                                        images=str(tmp_path / "images")))
    return samples[0]


def test_the_paper_recipe_trains_on_the_paper_text(tmp_path):
    config = PRESETS["sparkleschat-7b"].model
    p = Processor(byte_tokenizer((config.image_token,)), config)
    sample = turn_two_record(tmp_path)
    view = p.visualize(p.render(sample.conversation, loss_on=sample.loss_on, check_length=False))
    # §3.8: BOS, no system prompt, "###Human: " … "###Assistant: " answer "###", loss on the last answer and its
    # "###" only (§6.4); the trailing space of "###Assistant: " goes with the answer's first token (§4.4).
    assert SLOTS.sub("<ImageHere>", view) == f"<s>###Human: {Q1}###Assistant: {A1}###Human: {Q2}###Assistant:⟦ {A2}###⟧"
    assert "Give the following image" not in view and sample.loss_on == "last"


def sentencepiece_tokenizer(folder):
    """A LLaMA-style SentencePiece BPE tokenizer (byte fallback, dummy prefix), trained here on a few lines."""
    why = "SentencePiece tokenizers need the [sentencepiece] extra (also in [dev], which .ci/run installs)"
    spm = pytest.importorskip("sentencepiece", reason=why)
    pytest.importorskip("google.protobuf", reason=why)  # transformers reads the .model through its protobuf schema
    from transformers import AutoTokenizer

    lines = [f"###Human: {Q1}###Assistant: {A1}###Human: {Q2}###Assistant: {A2}###",
             "Human and Assistant talk about IMAGE#1 and IMAGE#2. The man sits on a bench in the park."] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=420,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
    return AutoTokenizer.from_pretrained(str(folder)), spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.mark.parametrize("generation", [True, False])
def test_sentencepiece_ids_are_the_originals(tmp_path, generation):
    """The original tokenizes each stretch of text between two images in one call, BOS on the first only (spec
    §3.7; training gives the same tokens, §4.4). A cut before "Human" would turn "###Human" into "###", "▁Human"."""
    tokenizer, sp = sentencepiece_tokenizer(tmp_path / "tok")
    config = dataclasses.replace(PRESETS["sparkleschat-7b"].model, tokens_per_image=3, system_prompt=SPARKLESCHAT_SYSTEM
                                 if generation else "")
    p = Processor(tokenizer, config)
    conversation = turn_two_record(tmp_path).conversation
    if generation:
        conversation = Conversation(conversation.messages[:-1])
    rendered = p.render(conversation, generation=generation, loss_on="last", check_length=False)
    text = "".join("<ImageHere>" if piece.slot is not None else piece.text
                   for piece in p.template.render(conversation, generation=generation, loss_on="last"))
    segments = text.split("<ImageHere>")
    expected = [sp.bos_id()] + sp.encode(segments[0])
    for segment in segments[1:]:
        expected += [p.image_token_id] * 3 + sp.encode(segment)
    assert rendered.input_ids == expected
    assert "Human" in tokenizer.convert_ids_to_tokens(rendered.input_ids)  # "###Human" kept whole, as the original
    if not generation:
        # §6.4: labels are the ids after the instruction, whose trailing lone "▁" is dropped from its count.
        instruction = text[:text.rindex(A2)]
        count = len([sp.bos_id()] + sum(([p.image_token_id] * 3 + sp.encode(s) if k else sp.encode(s)
                                         for k, s in enumerate(instruction.split("<ImageHere>"))), []))
        last = sp.encode(instruction.split("<ImageHere>")[-1])[-1]
        count -= instruction.endswith(" ") and last == sp.piece_to_id("▁")
        assert [i for i, label in enumerate(rendered.labels) if label != IGNORE] == list(range(count, len(expected)))
