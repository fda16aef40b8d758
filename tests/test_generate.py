"""Generation: cached equals uncached, batching with left padding, the sampler, stop handling, Chat."""

import pytest
import torch
from conftest import solid

from sparkles.config import SamplingParams
from sparkles.conversation import Conversation, Message, user_message
from sparkles.errors import ConfigError, ContextLengthError
from sparkles.generate import Chat, KVCache, generate, sample


def prompt_embeds(model, processor, text="Compare IMAGE#1 with IMAGE#2.", images=None):
    images = images if images is not None else [solid("red"), solid("blue")]
    encoded = processor.encode(Conversation((user_message(text, images),)), generation=True)
    ids = torch.tensor([encoded.rendered.input_ids])
    return model.embed(ids, model.encode_images(encoded.pixel_values)).detach()


def test_cached_greedy_generation_equals_uncached(tiny):
    model, processor = tiny
    embeds = prompt_embeds(model, processor)
    params = SamplingParams(max_new_tokens=24)
    cached = [int(t) for t in generate(model.lm, embeds, params)]
    uncached = [int(t) for t in generate(model.lm, embeds, params, use_cache=False)]
    assert len(cached) == 24
    assert cached == uncached


def test_a_kv_cache_carries_over_to_a_continuation(tiny):
    """Generating on top of a held cache equals generating from the whole prefix at once."""
    model, processor = tiny
    embeds = prompt_embeds(model, processor)
    head, tail = embeds[:, :-5], embeds[:, -5:]
    cache = KVCache()
    next(iter(generate(model.lm, head, SamplingParams(max_new_tokens=1), cache=cache)))
    # The cache now holds the head; drop nothing, feed the tail on top of it.
    params = SamplingParams(max_new_tokens=10)
    continued = [int(t) for t in generate(model.lm, tail, params, cache=cache)]
    whole = [int(t) for t in generate(model.lm, embeds, params)]
    assert cache.length == embeds.shape[1] + 9
    assert continued == whole


def test_left_padded_batch_gives_each_row_its_own_answer(tiny):
    model, processor = tiny
    a = prompt_embeds(model, processor)
    b = prompt_embeds(model, processor, "Which one is red, IMAGE#1 or IMAGE#2? Say it.",
                      [solid("green"), solid("red")])
    width = max(a.shape[1], b.shape[1])
    rows, masks = [], []
    for e in (a, b):
        pad = width - e.shape[1]
        rows.append(torch.cat([torch.zeros(1, pad, e.shape[2]), e], dim=1))
        masks.append(torch.tensor([[0] * pad + [1] * e.shape[1]]))
    params = SamplingParams(max_new_tokens=12)
    batch = torch.stack([t for t in generate(model.lm, torch.cat(rows), params, attention_mask=torch.cat(masks))])
    alone = [torch.stack(list(generate(model.lm, e, params))) for e in (a, b)]
    assert torch.equal(batch[:, 0], alone[0][:, 0])
    assert torch.equal(batch[:, 1], alone[1][:, 0])


def test_rows_stop_on_their_stop_id_and_then_repeat_it(tiny):
    model, processor = tiny
    embeds = prompt_embeds(model, processor)
    free = [int(t) for t in generate(model.lm, embeds, SamplingParams(max_new_tokens=8))]
    stop = free[3]
    out = [int(t) for t in generate(model.lm, embeds, SamplingParams(max_new_tokens=8), stop_ids=(stop,))]
    assert out == free[:free.index(stop) + 1]


def test_sampler_rules():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, greedy).tolist() == [1, 0]
    hot = SamplingParams(temperature=5.0, top_k=1)
    assert sample(logits, hot, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    nucleus = SamplingParams(temperature=5.0, top_p=0.01)
    assert sample(logits, nucleus, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    # The penalty divides a seen positive logit: token 1 (3.0 -> 1.5) falls behind token 2 (2.9).
    penalised = SamplingParams(repetition_penalty=2.0)
    assert sample(logits[:1], penalised, seen=torch.tensor([[1]])).tolist() == [2]
    free = SamplingParams(temperature=1.0)
    draws = [sample(logits, free, torch.Generator().manual_seed(s)).tolist() for s in (7, 7)]
    assert draws[0] == draws[1]
    many = sample(logits[:1].expand(400, -1), free, torch.Generator().manual_seed(1))
    assert set(many.tolist()) >= {1, 2}  # both near-tied tokens are drawn


def test_bad_sampling_params_are_config_errors():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": 0},
                {"repetition_penalty": 0}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


def test_chat_streams_the_same_text_as_it_answers_and_stops_on_a_stop_string(tiny):
    model, processor = tiny
    chat = Chat(model, processor)
    conversation = Conversation((user_message("Compare IMAGE#1 with IMAGE#2.", [solid("red"), solid("blue")]),))
    params = SamplingParams(max_new_tokens=30)
    full = "".join(chat.stream(conversation, params))
    assert chat.answer(conversation, params) == full.strip()
    assert len(chat.answer(conversation, SamplingParams(max_new_tokens=1))) <= 1  # one byte token
    cut = full.strip()[3:5]
    stopped = chat.answer(conversation, SamplingParams(max_new_tokens=30, stop=(cut,)))
    assert cut not in stopped and full.strip().startswith(stopped)
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    assert chat.answer(conversation, seeded) == chat.answer(conversation, seeded)


def test_chat_encodes_a_repeated_image_once_and_never_emits_image_tokens(tiny):
    model, processor = tiny
    calls = []
    original = model.encode_images
    model.encode_images = lambda pixels: calls.append(pixels.shape[0]) or original(pixels)
    same = solid("red", sha="same-bytes")
    first = user_message("IMAGE#1 and IMAGE#2", [same, same])
    chat = Chat(model, processor)
    reply = chat.reply(Conversation((first,)), SamplingParams(max_new_tokens=40))
    assert calls == [1]
    assert isinstance(reply[-1], Message) and reply[-1].role == "assistant"
    encoded = processor.encode(reply)
    assert encoded.rendered.input_ids.count(processor.image_token_id) == 2 * processor.config.tokens_per_image


def test_chat_refuses_a_prompt_that_leaves_no_room(tiny):
    model, processor = tiny
    import dataclasses

    from sparkles.processor import Processor

    small = Processor(processor.tokenizer, dataclasses.replace(processor.config, max_seq_len=40))
    chat = Chat(model, small)
    with pytest.raises(ContextLengthError):
        chat.answer(Conversation((Message.text_only("user", "x" * 60),)))


def test_a_batch_of_conversations_answers_like_each_alone(tiny):
    model, processor = tiny
    chat = Chat(model, processor)
    conversations = [
        Conversation((user_message("Compare IMAGE#1 with IMAGE#2.", [solid("red"), solid("blue")]),)),
        Conversation((Message.text_only("user", "No image at all, just a longer question here."),)),
        Conversation((user_message("<image>?", [solid("green")]),)),
    ]
    for params in (SamplingParams(max_new_tokens=15), SamplingParams(max_new_tokens=15, repetition_penalty=1.5)):
        assert chat.answer_batch(conversations, params) == [chat.answer(c, params) for c in conversations]


def test_a_cache_from_a_left_padded_batch_never_attends_to_its_padding(tiny):
    """The cache remembers which of its positions were padding, so a batch can be continued on it."""
    model, _ = tiny
    torch.manual_seed(1)
    short, long = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, 32), short], dim=1), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    cache = KVCache()
    next(iter(generate(model.lm, batch, SamplingParams(max_new_tokens=1), attention_mask=mask, cache=cache)))
    assert cache.mask is not None and cache.mask[0, :4].sum() == 0
    more = torch.randn(2, 3, 32)
    params = SamplingParams(max_new_tokens=10)
    batched = list(generate(model.lm, more, params, cache=cache))
    for row, prefix in enumerate((short, long)):
        alone = list(generate(model.lm, torch.cat([prefix, more[row:row + 1]], dim=1), params))
        assert [int(t[row]) for t in batched] == [int(t[0]) for t in alone]


def test_sampling_is_numerically_safe():
    logits = torch.randn(3, 50) * 20
    greedy = logits.argmax(-1)
    # A temperature this small would overflow the logits: it samples greedily instead.
    assert torch.equal(sample(logits, SamplingParams(temperature=1e-300), torch.Generator().manual_seed(0)), greedy)
    seen = torch.tensor([[1, 2], [3, 4], [5, 6]])
    strong = SamplingParams(temperature=1e-4, repetition_penalty=10.0)
    assert sample(logits, strong, torch.Generator().manual_seed(2**64 - 1), seen).shape == (3,)
    broken = logits.clone()
    broken[0], broken[1, 7] = float("nan"), float("inf")  # a model that misbehaves still gives a valid id
    ids = sample(broken, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert 0 <= int(ids[0]) < 50 and int(ids[1]) == 7


@pytest.mark.parametrize("bad", [{"seed": 2**64}, {"seed": -2**63 - 1}, {"temperature": float("nan")},
                                 {"repetition_penalty": 1e300}, {"stop": ("",)}, {"stop": ("x" * 257,)},
                                 {"stop": ("a", "b", "c", "d", "e")}, {"top_p": float("inf")}])
def test_sampling_params_are_bounded(bad):
    with pytest.raises(ConfigError, match="must"):
        SamplingParams(**bad)
    SamplingParams(seed=2**64 - 1), SamplingParams(seed=-2**63), SamplingParams(stop=("x" * 256,) * 4)


class CountingTable(list):
    lookups = 0

    def __getitem__(self, i):
        CountingTable.lookups += 1
        return super().__getitem__(i)


def test_a_long_stop_string_costs_linear_work_per_token():
    """The worst case for the old check (a stop string of 255 a's then b, text of a's) was quadratic in its length."""
    from sparkles.processor import TextStream, overlap, prefix_table

    word = "a" * 255 + "b"
    assert overlap("x" + "a" * 300, word, prefix_table(word)) == 255
    assert overlap("ab", "abab", prefix_table("abab")) == 2 and overlap("abab", "abab", prefix_table("abab")) == 2

    class Chars:  # one id per character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), (word,) * 4)
    stream.tables = [CountingTable(t) for t in stream.tables]
    per_token = []
    for _ in range(600):
        before = CountingTable.lookups
        assert stream.push(ord("a")) == ("a" if stream.ids[255:] else "")
        per_token.append(CountingTable.lookups - before)
    # At most 2 table lookups per character examined, and only the last len(word) characters are examined.
    assert max(per_token) <= 4 * 2 * len(word) and per_token[-1] == per_token[300]
    assert stream.push(ord("b")) == "" and stream.stopped and stream.text == "a" * 345
