"""The shapes world's tasks: captions, multi-image multi-turn dialogues, BISON- and NLVR2-style items, each an
`Item` (a `Conversation` and the `Truth` of every turn) drawn from a seed. Pure.

Scenes and their words are in `shapes.py`; the scorer (`score`, re-exported here) in `scoring.py`; the datasets on
disk and `sparkles world generate` in `sets.py`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from ..conversation import SLOT, Conversation, Image, Message, user_message
from ..errors import ConfigError
from . import shapes, worked
from .scoring import Score, Truth, score
from .shapes import Scene, SceneConfig, caption, count, noun, number_word, with_article

__all__ = ["Item", "Score", "Truth", "WorldConfig", "make_eval_set", "score"]
# Short questions with one-sentence answers; the spec §9.6 prompts with their step-by-step answers; or short
# questions with worked answers (`worked.py`: BISON, NLVR2 and the dialogue kinds that compare or count).
FORMS = ("short", "original", "worked")


@dataclass(frozen=True)
class WorldConfig:
    scene: SceneConfig = SceneConfig()
    image_size: int = 64  # pixels per side
    max_images: int = 5  # per dialogue, 2..5
    turns: int = 2  # per dialogue; the on-disk sets always have 2, as their schemas say
    form: str = "short"  # of BISON/NLVR2 items, one of FORMS

    def __post_init__(self):
        if not (2 <= self.max_images <= 5 and self.turns >= 2 and self.image_size >= 16 and self.form in FORMS):
            raise ConfigError(f"WorldConfig: expected 2 <= max_images <= 5, turns >= 2, image_size >= 16 and form "
                              f"in {FORMS}; got {self.max_images}, {self.turns}, {self.image_size}, {self.form!r}")


@dataclass(frozen=True)
class Item:
    id: str
    kind: str  # caption, dialogue, bison or nlvr2 (the keys of MAKERS)
    conversation: Conversation  # user turns with images, assistant turns holding the canonical answers
    truths: tuple[Truth, ...]  # one per assistant turn: score the model's k-th answer with truths[k]
    scenes: tuple[Scene, ...]  # of IMAGE#1, IMAGE#2, …

    @property
    def turns(self) -> tuple[Message, ...]:
        """The user messages: ask them one by one, each after the model's own earlier answers."""
        return tuple(m for m in self.conversation if m.role == "user")


def _image(scene: Scene, size: int) -> Image:
    # The digest is of the scene, not the pixels: rendering is deterministic, so equal scenes mean equal pixels.
    digest = hashlib.sha256(f"{size}:{scene!r}".encode()).hexdigest()
    return Image(pixels=shapes.render(scene, size), sha256=digest, caption=caption(scene))


def _names(labels: Sequence[str], last: str = "and") -> str:
    return shapes.join([f"IMAGE#{b}" for b in labels]).replace(" and ", f" {last} ")


# Questions. Each builder returns a Q, or None when the scenes do not give it one unique answer.


class Q(NamedTuple):
    """A question and its truth. Builders take (rng, scenes: label -> Scene, labels the question is about)."""

    text: str
    truth: Truth
    again: Callable[[str], Q | None] | None = None  # the same question about another image ("And in IMAGE#3?")
    worked: str | None = None  # the worked answer, where the builder knows better than `worked.dialogue`


def _count_q(rng, scenes, labels, attr=None, text=None) -> Q:
    """How many X in one image ("count") or in several together ("total")."""
    attr = shapes.pick_attr(rng, scenes[rng.choice(list(scenes))]) if attr is None else attr  # any image's: 0 too
    n, where, things = sum(count(scenes[b], **attr) for b in labels), _names(labels), noun(2, **attr)
    if len(labels) == 1:
        text = text or f"How many {things} are in {where}?"
        truth = Truth("count", f"{where} has {number_word(n)} {noun(n, **attr)}.", tuple(labels), count=n)
    else:
        text = f"How many {things} are in {where} together?"
        truth = Truth("total", f"{where} have {number_word(n)} {noun(n, **attr)} in total.", tuple(labels), count=n)
    return Q(text, truth, lambda b: _count_q(rng, scenes, [b], attr, f"And in IMAGE#{b}?"))


def _attribute_q(rng, scenes, labels, ask=None, key=None, text=None) -> Q | None:
    """The colour of the one <shape> in an image, or the shape of its one <colour> object."""
    a, ask = labels[0], ask or rng.choice(("color", "shape"))
    by = "shape" if ask == "color" else "color"
    key = key or getattr(rng.choice(scenes[a].objects), by)
    match = [o for o in scenes[a].objects if getattr(o, by) == key]
    if len(match) != 1:
        return None
    word = getattr(match[0], ask)
    if ask == "color":
        question, answer = f"What colour is the {key} in IMAGE#{a}?", f"The {key} in IMAGE#{a} is {word}."
    else:
        question = f"What is the {key} shape in IMAGE#{a}?"
        answer = f"The {key} shape in IMAGE#{a} is {with_article(word)}."
    return Q(text or question, Truth(ask, answer, (a,), words=(word,)),
             lambda b: _attribute_q(rng, scenes, [b], ask, key, f"And in IMAGE#{b}?"))


def _describe_q(rng, scenes, labels, text=None) -> Q:
    captions = tuple(caption(scenes[b]) for b in labels)
    answer = " ".join(f"IMAGE#{b} shows {c}." for b, c in zip(labels, captions))
    return Q(text or f"Describe {_names(labels)}.", Truth("caption", answer, tuple(labels), words=captions),
             lambda b: _describe_q(rng, scenes, [b], f"And IMAGE#{b}?"))


def _which_q(rng, scenes, labels, back=()) -> Q | None:
    """Which image has X; `back` are images of earlier turns, asked about as "the images we discussed"."""
    t = rng.choice(labels)
    others = [scenes[b] for b in labels if b != t]
    unique = [a for o in scenes[t].objects for a in ({"color": o.color}, {"shape": o.shape},
              {"color": o.color, "shape": o.shape}) if not any(count(s, **a) for s in others)]
    if not unique:
        return None
    thing = with_article(noun(1, **rng.choice(unique)))
    new = [b for b in labels if b not in back]
    among = shapes.join(["the images we discussed"] + [f"IMAGE#{b}" for b in new]) if back else _names(labels)
    return Q(f"Which of {among} has {thing}?", Truth("which", f"IMAGE#{t} has {thing}.", (t,)))


def _most_q(rng, scenes, labels) -> Q | None:
    attr = shapes.pick_attr(rng, scenes[rng.choice(labels)])
    counts = [count(scenes[b], **attr) for b in labels]
    best, things = max(counts), noun(2, **attr)
    if counts.count(best) > 1:
        return None
    w = labels[counts.index(best)]
    if len(labels) == 2:
        text, claim = f"Compare IMAGE#{labels[0]} with IMAGE#{labels[1]}: which has more {things}?", "more"
    else:
        text, claim = f"Which of {_names(labels)} has the most {things}?", "the most"
    return Q(text, Truth("most", f"IMAGE#{w} has {claim} {things}: {number_word(best)}.", (w,), count=best))


def _odd_q(rng, scenes, labels) -> Q | None:
    kinds = Counter(scenes[b].background.kind for b in labels)
    if len(labels) < 3 or len(kinds) != 2 or min(kinds.values()) != 1:
        return None
    odd = next(b for b in labels if kinds[scenes[b].background.kind] == 1)
    return Q(f"Which of {_names(labels, 'or')} is the odd one out by background?",
             Truth("odd", f"IMAGE#{odd} is the odd one out: it has a {scenes[odd].background.kind} background.",
                   (odd,)))


def _share_q(rng, scenes, labels) -> Q | None:
    a, b = labels[:2]
    what = rng.choice(("color", "shape"))
    common = {getattr(o, what) for o in scenes[a].objects} & {getattr(o, what) for o in scenes[b].objects}
    if len(common) != 1:
        return None
    word = common.pop()
    return Q(f"Which {'colour' if what == 'color' else 'shape'} do IMAGE#{a} and IMAGE#{b} share?",
             Truth("share", f"IMAGE#{a} and IMAGE#{b} both have {with_article(noun(1, **{what: word}))}.",
                   (a, b), words=(word,)))


SINGLE = (_count_q, _count_q, _attribute_q, _attribute_q, _describe_q)  # repeats weight the draw
MULTI = (_count_q, _which_q, _most_q, _most_q, _odd_q, _share_q)


def _ask(rng: random.Random, scenes, shown: list[str], new: list[str], last: Q | None) -> Q:
    """One question for a turn that brings `new` images after `shown` ones; it names every new image."""
    tries: list[Callable[[], Q | None]] = []
    if len(new) <= 1:
        one = new or [rng.choice(shown)]
        tries += [lambda f=f: f(rng, scenes, one) for f in SINGLE]
        if last is not None and last.again is not None and len(shown) + len(new) > 1:
            other = new or [rng.choice([b for b in shown if b not in last.truth.images] or shown)]
            tries += [lambda: last.again(other[0])] * 3  # referring back is the point of a later turn
    if len(shown) + len(new) > 1:
        old = rng.sample(shown, min(len(shown), rng.randint(max(0, 2 - len(new)), max(0, 4 - len(new)))))
        group = sorted(new + old, key=int)
        tries += [lambda f=f: f(rng, scenes, group) for f in MULTI]
        if shown:
            tries += [lambda: _which_q(rng, scenes, shown + new, back=shown)] * 2
    rng.shuffle(tries)
    for attempt in tries:
        q = attempt()
        if q is not None and all(re.search(rf"IMAGE#{b}\b", q.text) for b in new):
            return q
    return _describe_q(rng, scenes, new or [rng.choice(shown)])  # always possible, and names every new image


# Items


def _rng(seed: int | str, name: str, i: int) -> random.Random:
    return random.Random(f"{seed}/{name}/{i}")  # a str seed is hashed with SHA-512: the same on every run


def make_caption(rng: random.Random, config: WorldConfig = WorldConfig(), *, images: int = 1,
                 item_id: str = "") -> Item:
    """"Describe IMAGE#1." -> "IMAGE#1 shows <caption>."; with 2-3 images, each described in turn."""
    scenes = {str(k + 1): shapes.sample_scene(rng, config.scene) for k in range(images)}
    return _item(item_id, "caption", scenes, [(list(scenes), _describe_q(rng, scenes, list(scenes)))], config)


def make_dialogue(rng: random.Random, config: WorldConfig = WorldConfig(), *, item_id: str = "") -> Item:
    """2..max_images images over `config.turns` turns; turn 2 brings new images; questions may refer back."""
    m = rng.randint(2, config.max_images)
    scenes = {str(k + 1): shapes.sample_scene(rng, config.scene) for k in range(m)}
    first = rng.randint(1, min(3, m - 1))
    later = [1] + [rng.randint(1, config.turns - 1) for _ in range(m - first - 1)]  # turn 2 brings one at least
    split = [first] + [later.count(t) for t in range(1, config.turns)]  # new images per turn
    turns, shown, last = [], [], None
    for k in split:
        new = [str(len(shown) + i + 1) for i in range(k)]
        last = _ask(rng, scenes, shown, new, last)
        turns.append((new, last))
        shown += new
    return _item(item_id, "dialogue", scenes, turns, config)


def _item(item_id: str, kind: str, scenes, turns: list[tuple[list[str], Q]], config: WorldConfig,
          meta: Mapping[str, str] | None = None) -> Item:
    # Each slot goes where the text first names its image; so do the original prompts' slots, once removed.
    messages, known = [], []
    for new, q in turns:
        images = [_image(scenes[b], config.image_size) for b in new]
        said = q.truth.answer
        if config.form == "worked" and q.truth.kind in worked.WORKED_KINDS:
            said = q.worked or worked.dialogue(said, scenes, q.text, known)
        messages += [user_message(q.text, images, known=known), Message.text_only("assistant", said)]
        known += new
    return Item(item_id, kind, Conversation(tuple(messages), meta or {}), tuple(q.truth for _, q in turns),
                tuple(scenes.values()))


def make_bison(rng: random.Random, config: WorldConfig = WorldConfig(), *, item_id: str = "") -> Item:
    """A caption and two images that differ in one thing; the answer names the one that matches."""
    from ..eval.tasks.bison import PROMPT  # the original's prompt lives with its evaluator

    true = shapes.sample_scene(rng, config.scene)
    other, _ = shapes.vary(true, rng, config.scene)
    label = "1" if rng.random() < 0.5 else "2"
    pair = (true, other) if label == "1" else (other, true)
    text = caption(true)
    if config.form == "original":
        prompt, answer = PROMPT, f"{worked.steps(pair)} (IMAGE#1 or IMAGE#2) is IMAGE#{label}."
    else:
        prompt, answer = "Which image matches the caption '{}': IMAGE#1 or IMAGE#2?", f"IMAGE#{label} matches it."
    q = Q(prompt.format(text).replace(SLOT, ""), Truth("bison", answer, (label,)),
          worked=worked.bison(pair, text, label))
    return _item(item_id, "bison", {"1": pair[0], "2": pair[1]}, [(["1", "2"], q)], config, {"caption": text})


def make_nlvr2(rng: random.Random, config: WorldConfig = WorldConfig(), *, item_id: str = "") -> Item:
    """A statement about a left and a right image, true or false; each template is true half of the time."""
    from ..eval.tasks.nlvr2 import PROMPT

    want, template, said = rng.random() < 0.5, rng.choice(shapes.STATEMENTS), None
    while said is None:  # new pairs until this template can say something `want`-true about one
        pair = (shapes.sample_scene(rng, config.scene), shapes.sample_scene(rng, config.scene))
        said = next((c for _ in range(20) if (c := shapes.claim(rng, pair, template, want, config.scene))), None)
    sentence, attr = said
    value = "TRUE" if want else "FALSE"
    if config.form == "original":
        prompt, answer = PROMPT, f"{worked.steps(pair)} (TRUE or FALSE) is {value}."
    else:
        prompt, answer = "Left: IMAGE#1. Right: IMAGE#2. True or false: {}", f"{value.capitalize()}."
    q = Q(prompt.format(sentence).replace(SLOT, ""), Truth("nlvr2", answer, ("1", "2"), value=want),
          worked=worked.nlvr2(pair, attr, want))
    return _item(item_id, "nlvr2", {"1": pair[0], "2": pair[1]}, [(["1", "2"], q)], config, {"sentence": sentence})


MAKERS = {"caption": make_caption, "dialogue": make_dialogue, "bison": make_bison, "nlvr2": make_nlvr2}


def make_eval_set(n: int, seed: int = 0, config: WorldConfig = WorldConfig()) -> list[Item]:
    """n each of bison, nlvr2, 2-turn dialogue and 1-image caption items, as `generate` writes them; per-kind seeds."""
    return [MAKERS[kind](_rng(seed, name, i), replace(config, turns=2), item_id=f"{kind}-{seed}-{i}") for kind, name
            in (("bison", "BISON"), ("nlvr2", "NLVR2"), ("dialogue", "SparklesEval"), ("caption", "captions"))
            for i in range(n)]
