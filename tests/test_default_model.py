"""The embedded default model: shipped small, loaded by name, and better than a blind model on fresh items."""

from pathlib import Path

import sparkles
from sparkles.config import SamplingParams
from sparkles.generate import Chat
from sparkles.model.checkpoint import DEFAULT_CHECKPOINT, is_untrained_default
from sparkles.world.data import WORKED_TOKENS, evaluate_world

# How far above its own blind self (the same items, every image flat grey) the shipped model must stay. A model
# that cannot see scores the same on both, so these fail for it however well it has learned the answers' wording.
# Set well under the margins the shipped model has on these items (see the README's table), far above noise.
# BISON is left out: on these 24 items the shipped model is only +0.08 above its blind self (it is +0.32 on 300).
MARGINS = {"caption": 0.6, "caption recall": 0.6, "dialogue turn 1": 0.35, "dialogue turn 2": 0.35,
           "nlvr2": 0.15}  # shipped: +0.96, +0.98, +0.67, +0.71, +0.38


def test_the_default_model_is_shipped_and_fits_the_repository():
    assert (DEFAULT_CHECKPOINT / "config.json").is_file() and not is_untrained_default(None)
    size = sum(p.stat().st_size for p in Path(DEFAULT_CHECKPOINT).iterdir())
    assert size < 25 * 2**20


def test_the_default_model_sees_what_its_blind_self_cannot():
    chat = sparkles.Chat(*sparkles.load())
    params = SamplingParams(max_new_tokens=WORKED_TOKENS)  # room for worked answers, whose verdict comes last
    seen = evaluate_world(chat, n=24, seed=4242, params=params).accuracy
    blind = evaluate_world(chat, n=24, seed=4242, params=params, blank=True).accuracy
    for kind, margin in MARGINS.items():
        assert seen[kind] >= blind[kind] + margin, (kind, margin, seen, blind)


def test_the_default_model_reads_its_own_images():
    """Sanity: it names an image it was shown, in the template it was trained with."""
    chat = Chat(*sparkles.load())
    import random

    from sparkles.world.tasks import WorldConfig, make_caption

    item = make_caption(random.Random(9), WorldConfig())
    answer = chat.answer(sparkles.Conversation(item.conversation.messages[:1]))
    assert answer.startswith("IMAGE#1")
