"""The embedded default model: shipped small, loaded by name, and better than a blind model on fresh items."""

from pathlib import Path

import sparkles
from sparkles.config import SamplingParams
from sparkles.generate import Chat
from sparkles.model.checkpoint import DEFAULT_CHECKPOINT, is_untrained_default
from sparkles.world.data import evaluate_world

# Floors well under what the shipped model scores on these 24 items of each type (0.54, 0.63, 0.42 when it was
# shipped) and near chance: a broken model, tokenizer or template falls far below them.
FLOORS = {"bison": 0.4, "nlvr2": 0.45, "dialogue": 0.25}


def test_the_default_model_is_shipped_and_fits_the_repository():
    assert (DEFAULT_CHECKPOINT / "config.json").is_file() and not is_untrained_default(None)
    size = sum(p.stat().st_size for p in Path(DEFAULT_CHECKPOINT).iterdir())
    assert size < 25 * 2**20


def test_the_default_model_answers_fresh_items_above_its_floor():
    chat = sparkles.Chat(*sparkles.load())
    result = evaluate_world(chat, n=24, seed=4242, params=SamplingParams(max_new_tokens=48))
    for kind, floor in FLOORS.items():
        assert result.accuracy[kind] >= floor, (kind, result.accuracy)


def test_the_default_model_reads_its_own_images():
    """Sanity: it names an image it was shown, in the template it was trained with."""
    chat = Chat(*sparkles.load())
    import random

    from sparkles.world.tasks import WorldConfig, make_caption

    item = make_caption(random.Random(9), WorldConfig())
    answer = chat.answer(sparkles.Conversation(item.conversation.messages[:1]))
    assert answer.startswith("IMAGE#1")
