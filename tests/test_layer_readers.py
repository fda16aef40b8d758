"""What every reader of images inside the LM (adapters, gated cross-attention; `model/layer_state.py`) must keep:
cached decoding equals full recomputation, a session equals re-prefilling, and a batch row, in `Chat`, in a
`BatchSession` or in the serve engine (joining a running batch too), equals the row alone."""

import dataclasses
import json

import pytest
import torch
from conftest import logits, solid, tiny_config, two_images
from PIL import Image as PILImage
from test_adapters import build as build_adapted
from test_cross_attention import build as build_crossed
from test_cross_attention import cross

from sparkles.batch_session import BatchSession
from sparkles.config import AdapterConfig, DataConfig, DataSource, OptimConfig, SamplingParams, TrainConfig
from sparkles.conversation import Conversation, Message, Text, user_message
from sparkles.engine import Engine, EngineConfig
from sparkles.generate import Chat, generate
from sparkles.llama_step import LlamaStep
from sparkles.model.checkpoint import load_checkpoint
from sparkles.model.layer_state import state_kwargs
from sparkles.model.model import build_model
from sparkles.session import ChatSession
from sparkles.train.loop import train

GREEDY = SamplingParams(max_new_tokens=8)
# name -> (builder, its argument, the switch)
READERS = {"imagebind": (build_adapted, "imagebind", "model.adapter.kind=imagebind"),
           "llama-adapter": (build_adapted, "llama-adapter", "model.adapter.kind=llama-adapter"),
           "cross-attention, previous image": (build_crossed, "previous", "model.cross_attention.every=1"),
           "cross-attention, all images": (build_crossed, "all", "model.cross_attention.every=1")}


def build(name):
    """The reader with its gates opened, as a trained model's are: at zero they add nothing and prove little."""
    builder, value, _ = READERS[name]
    return builder(value, gates=0.5)


@pytest.mark.parametrize("name", READERS)
def test_zero_gates_give_the_base_lm_logits_exactly(name):
    builder, value, _ = READERS[name]
    model, processor = builder(value)  # the gates as a new model has them: zero
    torch.manual_seed(0)
    base, base_processor = build_model(tiny_config())
    base.lm.load_state_dict(model.lm.state_dict())
    text_only = Conversation((Message.text_only("user", "What is a square?"),))
    assert torch.equal(logits(model, processor, text_only), logits(base.eval(), base_processor, text_only))
    # With images too: the LM with the reader, on the marker embeddings, computes what the bare LM computes on them.
    encoded = processor.encode(two_images(), generation=True)
    ids = torch.tensor([encoded.rendered.input_ids])
    with torch.no_grad():
        images = model.encode_images(encoded.pixel_values)
        embeds = model.embed(ids, images)
        read = model.lm(inputs_embeds=embeds, **state_kwargs(model.signal(ids, images))).logits
        assert torch.equal(read, base.lm(inputs_embeds=embeds).logits)


@pytest.mark.parametrize("name", READERS)
def test_cached_greedy_generation_equals_full_recomputation_without_the_fast_step(name, monkeypatch):
    model, processor = build(name)
    encoded = processor.encode(two_images(), generation=True)
    ids = torch.tensor([encoded.rendered.input_ids])
    images = model.encode_images(encoded.pixel_values)
    embeds, state = model.embed(ids, images).detach(), model.signal(ids, images)
    params = SamplingParams(max_new_tokens=16)
    monkeypatch.setattr(LlamaStep, "fits", staticmethod(lambda lm: True))  # were the step asked, it would run wrongly
    cached = [int(t) for t in generate(model.lm, embeds, params, signal=state)]
    uncached = [int(t) for t in generate(model.lm, embeds, params, signal=state, use_cache=False)]
    assert len(cached) == 16 and cached == uncached


@pytest.mark.parametrize("name", READERS)
def test_a_session_whose_later_turn_adds_an_image_equals_full_reprefill(name):
    model, processor = build(name)
    chat, session = Chat(model, processor), ChatSession(model, processor)
    conversation = Conversation()
    for text, colors in [("Compare IMAGE#1 with IMAGE#2.", ["red", "blue"]), ("Hello?", []),
                         ("And IMAGE#3?", ["green"])]:
        conversation = conversation.append(user_message(text, [solid(c) for c in colors], known=conversation.labels))
        expected = chat.answer(conversation, GREEDY)
        assert session.answer(text, [solid(c) for c in colors], GREEDY) == expected
        conversation = conversation.append(Message("assistant", (Text(expected),)))
    assert session.stats["tokens_reused"] > 0 and session.stats["images_encoded"] == 3
    session.undo()  # cut back before the third image: the asked-again turn reads it afresh
    again = Conversation(conversation.messages[:-1])
    assert session.answer("And IMAGE#3?", [solid("green")], GREEDY) == chat.answer(again, GREEDY)


@pytest.mark.parametrize("name", READERS)
def test_batches_and_the_serve_engine_answer_as_each_row_alone(name):
    model, processor = build(name)
    chat = Chat(model, processor)
    conversations = [two_images(), Conversation((user_message("Is IMAGE#1 red?", [solid("red")]),)),
                     Conversation((Message.text_only("user", "Hello there."),)),
                     two_images("IMAGE#2 or IMAGE#1, which is red?", ("green", "red"))]
    alone = [chat.answer(c, GREEDY) for c in conversations]
    assert chat.answer_batch(conversations, GREEDY) == alone
    assert BatchSession(chat).answer_batch(conversations, GREEDY) == alone
    engine = Engine(model, processor, EngineConfig(max_batch=4))
    try:
        together = [engine.submit(engine.encode(c), GREEDY) for c in conversations]  # prefilled as one group
        answers = ["".join(e.text for e in r).strip() for r in together]
        first = engine.submit(engine.encode(conversations[0]), SamplingParams(max_new_tokens=24))
        events = iter(first)
        head = next(events)  # decoding has begun: the next ones join a running batch, their states merged in
        joined = [engine.submit(engine.encode(c), GREEDY) for c in conversations[1:]]
        joined_answers = ["".join(e.text for e in r).strip() for r in joined]
        assert head.error is None and all(e.error is None for e in events)
    finally:
        engine.close()
    assert answers == alone and joined_answers == alone[1:]


@pytest.mark.parametrize("name", READERS)
def test_the_engine_s_prefix_cache_resumes_a_replayed_conversation_with_its_images(name):
    """Each request carries the whole history, as an OpenAI client sends it: later turns resume from the stored
    prefix, whose images' features come with it (their positions are read by the later ones), and every answer is
    the one `Chat` gives the whole conversation."""
    model, processor = build(name)
    chat = Chat(model, processor)
    engine = Engine(model, processor, EngineConfig(prefix_cache_mb=64))
    conversation, answers = Conversation(), []
    try:
        for text, colors in [("Compare IMAGE#1 with IMAGE#2.", ["red", "blue"]), ("And IMAGE#3?", ["green"]),
                             ("Which was first?", []), ("And IMAGE#4 with IMAGE#1?", ["yellow"])]:
            conversation = conversation.append(user_message(text, [solid(c) for c in colors],
                                                            known=conversation.labels))
            answer = "".join(engine.stream(conversation, GREEDY)).strip()
            answers.append((answer, chat.answer(conversation, GREEDY)))
            conversation = conversation.append(Message("assistant", (Text(answer),)))
        stats = engine.stats()["prefix_cache"]
    finally:
        engine.close()
    assert all(a == b for a, b in answers), answers
    assert stats["hits"] == 3 and stats["tokens_reused"] > 0


@pytest.mark.parametrize("switch", ["llama-adapter", "cross-attention"])
def test_the_training_loop_runs_with_packed_rows_and_the_zero_gates_learn(switch, tmp_path):
    records = []
    for n in range(4):
        PILImage.new("RGB", (40, 30), (200, 60 * n, 30)).save(tmp_path / f"{n}.png")
        records.append({"image": f"{n}.png", "conversations": [{"from": "human", "value": "<image> Colour?"},
                                                                {"from": "gpt", "value": f"Shade {n}."}]})
    (tmp_path / "d.json").write_text(json.dumps(records))
    changes = ({"adapter": AdapterConfig(kind="llama-adapter")} if switch == "llama-adapter"
               else {"cross_attention": cross("all")})
    config = TrainConfig(model=dataclasses.replace(tiny_config(), **changes), out=str(tmp_path / "run"),
                         save_every=100, seed=1,
                         data=DataConfig(sources=(DataSource(str(tmp_path / "d.json"), images=str(tmp_path)),),
                                         pack=True),
                         optim=OptimConfig(lr_connector=1e-2, max_steps=6, batch_size=4))
    loaded, _ = load_checkpoint(train(config))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    if switch == "llama-adapter":
        assert loaded.config.adapter.kind == "llama-adapter" and loaded.adapters.gate.abs().sum() > 0
    else:
        assert loaded.config.cross_attention.sees == "all"
        assert loaded.cross_attention.blocks[0].attn_gate.abs().sum() > 0
