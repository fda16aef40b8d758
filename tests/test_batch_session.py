"""BatchSession: a batch's next turn resumes from the last call's cache and answers exactly as a fresh prefill."""

import dataclasses

import pytest
import torch
from conftest import solid, tiny_config

from sparkles.batch_session import BatchSession
from sparkles.config import SamplingParams
from sparkles.conversation import Conversation, Message, Text, user_message
from sparkles.generate import Chat
from sparkles.model.model import build_model

GREEDY = SamplingParams(max_new_tokens=12)
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def chat():
    torch.manual_seed(0)
    model, processor = build_model(tiny_config())
    return Chat(model.eval(), processor)


def first_turns(n: int) -> list[Conversation]:
    """n conversations of different lengths and images, so that the batch is left-padded."""
    return [Conversation((user_message("Describe IMAGE#1" + " please" * k + ".", [solid(COLORS[k])]),))
            for k in range(n)]


def next_turn(conversation: Conversation, answer: str, k: int) -> Conversation:
    """The conversation, its answer and a new question; every other one brings a new image."""
    known = [str(i + 1) for i in range(len(conversation.images))]
    text = f"And IMAGE#{len(known) + 1}?" if k % 2 else "Say it again" + "!" * k
    images = [solid(COLORS[-1 - k])] if k % 2 else []
    return conversation.append(Message("assistant", (Text(answer),))).append(user_message(text, images,
                                                                                         known=known))


def counting_images(model):
    calls = []
    real = model.encode_images

    def spy(pixels):
        calls.append(pixels.shape[0])
        return real(pixels)

    model.encode_images = spy
    return calls


def test_three_turns_answer_as_fresh_prefills_and_reuse_the_cache(chat):
    session, fresh = BatchSession(chat), first_turns(4)
    resumed = list(fresh)
    for turn in range(3):
        expected = chat.answer_batch(fresh, GREEDY)
        calls = counting_images(chat.model)
        got = session.answer_batch(resumed, GREEDY)
        del chat.model.encode_images
        assert got == expected, turn
        if turn:  # only the images new in this turn are encoded
            assert sum(calls) == sum(k % 2 for k in range(4)) and session.reused > 0
        fresh = [next_turn(c, a, k) for k, (c, a) in enumerate(zip(fresh, expected))]
        resumed = [next_turn(c, a, k) for k, (c, a) in enumerate(zip(resumed, got))]


def test_rows_may_come_back_reordered_fewer_or_shorter(chat):
    session = BatchSession(chat)
    turn1 = first_turns(4)
    answers = session.answer_batch(turn1, GREEDY)
    turn2 = [next_turn(c, a, k) for k, (c, a) in enumerate(zip(turn1, answers))]
    asked = [turn2[2], turn1[0], turn2[3]]  # reordered, one dropped, one asked again (a resample)
    assert session.answer_batch(asked, GREEDY) == chat.answer_batch(asked, GREEDY)
    assert session.reused > 0


def test_a_different_image_under_the_same_tokens_is_not_reused(chat):
    session = BatchSession(chat)
    session.answer_batch(first_turns(2), GREEDY)
    swapped = [Conversation((user_message("Describe IMAGE#1.", [solid("black")]),)),
               Conversation((user_message("Describe IMAGE#1 please.", [solid("white")]),))]
    calls = counting_images(chat.model)
    got = session.answer_batch(swapped, GREEDY)
    del chat.model.encode_images
    assert got == chat.answer_batch(swapped, GREEDY)
    assert sum(calls) == 2  # both images encoded again: their tokens matched, their content did not


def test_sampling_with_a_seed_and_a_penalty_matches_too(chat):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.3)
    session, turn1 = BatchSession(chat), first_turns(3)
    answers = chat.answer_batch(turn1, params)
    assert session.answer_batch(turn1, params) == answers
    turn2 = [next_turn(c, a, k) for k, (c, a) in enumerate(zip(turn1, answers))]
    assert session.answer_batch(turn2, params) == chat.answer_batch(turn2, params)


def test_mmca_answers_afresh(chat):
    model, processor = build_model(dataclasses.replace(tiny_config(), attention="mmca"))
    mmca = Chat(model.eval(), processor)
    session, turn1 = BatchSession(mmca), first_turns(2)
    assert session.answer_batch(turn1, GREEDY) == mmca.answer_batch(turn1, GREEDY)
    assert session.cache is None and session.reused == 0


def test_nothing_is_held_past_the_memory_bound(chat):
    session = BatchSession(chat, max_held_mb=0)
    turn1 = first_turns(2)
    answers = session.answer_batch(turn1, GREEDY)
    assert session.cache is None
    turn2 = [next_turn(c, a, k) for k, (c, a) in enumerate(zip(turn1, answers))]
    assert session.answer_batch(turn2, GREEDY) == chat.answer_batch(turn2, GREEDY) and session.reused == 0


def test_positions_given_up_do_not_pile_up(chat):
    """Each call keeps only the shared starts, packed: the cache stays as long as one turn's prompt and answer."""
    session, longest = BatchSession(chat), 0
    for k in range(6):
        batch = [Conversation((user_message(f"Round {k}: describe IMAGE#1" + "!" * j, [solid(COLORS[(k + j) % 6])]),))
                 for j in range(3)]
        assert session.answer_batch(batch, GREEDY) == chat.answer_batch(batch, GREEDY)
        longest = max(longest, *(len(chat.processor.encode(c, generation=True).rendered) for c in batch))
        assert session.cache.length <= longest + GREEDY.max_new_tokens
