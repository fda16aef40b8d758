"""Prompt-lookup decoding (`lookahead.py`): the same greedy tokens as plain decoding, in fewer steps where the
guesses come true; the cache it leaves holds exactly what plain decoding's would; sessions and the CLI take it."""

import pytest
import torch
from conftest import solid, tiny, two_images
from test_decode_fast import ids, llama

from sparkles import llama_step
from sparkles.config import SamplingParams
from sparkles.generate import Chat, KVCache, generate
from sparkles.lookahead import Guesser
from sparkles.session import ChatSession

__all__ = ["tiny"]  # the fixture, used by name


def test_the_guess_is_what_followed_the_longest_recent_match():
    guesser = Guesser([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7])
    assert guesser.guess(3) == [9, 2, 6]  # "6 7" last came before 9: the most recent occurrence wins
    guesser.extend([9])
    assert guesser.guess(2) == [2, 6]  # "6 7 9" matched whole, the longest suffix first
    assert Guesser([1, 2, 3]).guess(4) == []  # nothing repeats: no guess, a plain step
    assert Guesser([4, 4]).guess(5) == [4]  # the continuation ends where the ids do


def test_every_position_s_logits_equal_one_at_a_time():
    lm = llama()
    table = lm.get_input_embeddings()
    with torch.inference_mode():
        one, many = KVCache(), KVCache()
        for cache in (one, many):
            list(generate(lm, table(ids(1, 20)), SamplingParams(max_new_tokens=1), cache=cache))
        step, new = llama_step.LlamaStep(lm), ids(1, 4, seed=3)
        singles = [step(table(new[:, i:i + 1]), torch.tensor([[20 + i]]), None, one.past) for i in range(4)]
        mask = torch.ones(4, 24, dtype=torch.bool).tril(20)[None, None]
        together = step(table(new), torch.arange(20, 24)[None], mask, many.past, every=True)
    torch.testing.assert_close(together[0], torch.cat(singles), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_tokens_and_the_cache_equal_plain_decoding(k):
    lm = llama()
    table = lm.get_input_embeddings()
    with torch.inference_mode():
        for seed in range(4):
            prompt = ids(1, 30, seed=seed)
            for params, stops, banned in [(SamplingParams(max_new_tokens=40), (), ()),
                                          (SamplingParams(max_new_tokens=2), (), ()),
                                          (SamplingParams(max_new_tokens=40), (7, 11), (5, 999))]:
                runs = []
                for lookahead in (0, k):
                    cache = KVCache()
                    tokens = [int(t) for t in generate(lm, table(prompt), params, seen=prompt, cache=cache,
                                                       input_ids=prompt, stop_ids=stops, suppress_ids=banned,
                                                       lookahead=lookahead)]
                    runs.append((tokens, cache.length, cache.token_ids, cache.past.get_seq_length()))
                assert runs[0] == runs[1]
                tokens, length, held, _ = runs[0]
                assert length == len(held) == 30 + len(tokens) - 1  # the last token out is never fed


def test_a_reader_that_stops_early_leaves_the_cache_as_plain_decoding_does():
    """The step writes a whole chunk of kept guesses; a reader that stops in the middle of it (a stop string, a
    closed stream) still finds the cache holding every token before the last one it got, and no more."""
    lm = llama()
    prompt = ids(1, 30)
    with torch.inference_mode():
        for taken in (1, 5, 17, 23):
            caches = []
            for lookahead in (0, 6):
                cache, tokens = KVCache(), []
                stream = generate(lm, lm.get_input_embeddings()(prompt), SamplingParams(max_new_tokens=60),
                                  seen=prompt, cache=cache, input_ids=prompt, lookahead=lookahead)
                for token in stream:
                    tokens.append(int(token))
                    if len(tokens) == taken:
                        break
                stream.close()
                caches.append((tokens, cache.length, list(cache.token_ids), cache.past.get_seq_length()))
            assert caches[0] == caches[1]
            assert caches[1][1] == 30 + taken - 1 == len(caches[1][2]) == caches[1][3]


def test_guesses_that_come_true_save_steps(monkeypatch):
    """A random LM's greedy text repeats itself, which is what the guesses feed on: fewer passes, same tokens."""
    lm = llama()
    calls = []
    call = llama_step.LlamaStep.__call__
    monkeypatch.setattr(llama_step.LlamaStep, "__call__", lambda self, *a, **k: calls.append(1) or call(self, *a, **k))
    prompt = ids(1, 30)
    with torch.inference_mode():
        plain = [int(t) for t in generate(lm, lm.get_input_embeddings()(prompt), SamplingParams(max_new_tokens=60))]
        steps_plain, calls[:] = len(calls), []
        ahead = [int(t) for t in generate(lm, lm.get_input_embeddings()(prompt), SamplingParams(max_new_tokens=60),
                                          seen=prompt, lookahead=4)]
    assert ahead == plain and steps_plain == 59 and len(calls) < 0.8 * steps_plain


def test_sampling_and_batches_ignore_it():
    lm = llama()
    prompt = lm.get_input_embeddings()(ids(2, 12))
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, seed=5)
    with torch.inference_mode():
        for params, embeds in [(sampled, prompt[:1]), (SamplingParams(max_new_tokens=20), prompt)]:
            a = torch.stack(list(generate(lm, embeds, params)), 1)
            b = torch.stack(list(generate(lm, embeds, params, lookahead=4)), 1)
            assert torch.equal(a, b)


def test_a_session_with_lookahead_answers_as_chat_does_turn_after_turn(tiny):
    model, processor = tiny
    plain, ahead = ChatSession(model, processor), ChatSession(model, processor, lookahead=4)
    chat = Chat(model, processor, lookahead=4)
    params = SamplingParams(max_new_tokens=24)
    for text, images in [("Compare IMAGE#1 with IMAGE#2.", ["red", "blue"]), ("And IMAGE#3?", ["green"]),
                         ("Which was first?", [])]:
        expected = plain.answer(text, [solid(c) for c in images], params)
        assert ahead.answer(text, [solid(c) for c in images], params) == expected
    assert chat.answer(two_images(), params) == Chat(model, processor).answer(two_images(), params)
    ahead.undo()
    plain.undo()
    assert ahead.answer("Which was first?", [], params) == plain.answer("Which was first?", [], params)


def test_the_web_ui_s_sessions_and_the_chat_command_take_it(tiny, monkeypatch):
    import argparse

    from sparkles import cli
    from sparkles.conversation import Conversation
    from sparkles.errors import ConfigError
    from sparkles.serve.webui import _session

    model, processor = tiny
    assert _session(None, Chat(model, processor, lookahead=3), Conversation()).lookahead == 3
    monkeypatch.setattr("sparkles.model.checkpoint.load", lambda *a, **k: (model, processor))
    args = argparse.Namespace(model=None, dtype=None, device="cpu", system=None, lookahead=2)
    assert cli.load_chat(args).lookahead == 2
    with pytest.raises(ConfigError, match="--lookahead"):
        cli.load_chat(argparse.Namespace(**{**vars(args), "lookahead": -1}))


def test_a_stop_string_inside_a_checked_chunk_leaves_the_session_as_plain_decoding_does(tiny):
    """A chunk of kept guesses may run past a stop string: the session keeps only what its answer renders to, so
    the next turn sees the same cache either way."""
    model, processor = tiny
    question = ("Compare IMAGE#1 with IMAGE#2.", [solid("red"), solid("blue")])
    free = ChatSession(model, processor).answer(*question, SamplingParams(max_new_tokens=24))
    stop = next(free[i:i + 2] for i in range(len(free) // 2, len(free) - 1) if free[i:i + 2].strip())
    params = SamplingParams(max_new_tokens=24, stop=(stop,))
    plain, ahead = ChatSession(model, processor), ChatSession(model, processor, lookahead=6)
    first = plain.answer(*question, params)
    assert ahead.answer(*question, params) == first and len(first) < len(free)
    assert ahead.cache.token_ids == plain.cache.token_ids and ahead.cache.length == plain.cache.length
    assert ahead.answer("And then?", [], params) == plain.answer("And then?", [], params)
