"""The template teacher: multi-image dialogues written from the shapes world's scene structure, with no LLM.

Its reply is the JSON an LLM teacher is asked for, so it takes the same path (parse, check, de-duplicate, write),
and every answer is exact: counts, colours, shapes and comparisons across the images, naming them IMAGE#<id>.
Scenes are {"background": …, "objects": [{"shape", "color", "size", "x", "y"}, …]}. Pure functions only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import InputError
from .prompts import Caption, DialogueSpec, number_word

Turn = tuple[str, str]  # (user question, assistant answer)


def check_scenes(captions: Sequence[Caption], source: str) -> None:
    """The template teacher needs a scene with objects for every image; say which captions lack one."""
    missing = [c.key for c in captions if not isinstance(c.scene, Mapping) or not _objects(c)]
    if missing:
        raise InputError(f"the template teacher writes dialogues from scenes, but {len(missing)} of {len(captions)} "
                         f"captions in {source} have no 'scene' with objects (first: {missing[0]}); use a captions "
                         "file from the shapes world, or an LLM teacher (--teacher-base-url, --teacher-model)")


def template_reply(candidates: Sequence[Caption], first_images: Sequence[int], *, spec: DialogueSpec, seed: int) -> str:
    """One dialogue per entry of `first_images`, as the JSON list of dialogues the LLM teacher is asked to write."""
    rng = random.Random(seed)
    order = list(candidates)
    rng.shuffle(order)
    dialogues, pos = [], 0
    for first in first_images:
        later, room = [], len(order) - first
        for left in range(spec.turns - 1, 0, -1):  # leave room for the later turns' fewest images
            later.append(rng.randint(spec.later_images[0], min(spec.later_images[1],
                                                                 room - spec.later_images[0] * (left - 1))))
            room -= later[-1]
        need = first + sum(later)
        pos = 0 if pos + need > len(order) else pos  # images repeat across dialogues only when they run out
        dialogues.append(_dialogue(order[pos:pos + need], first, later, rng))
        pos += need
    return json.dumps(dialogues, ensure_ascii=False)


def _dialogue(images: Sequence[Caption], first: int, later: Sequence[int], rng: random.Random) -> list[dict]:
    shown = list(images[:first])
    question, answer = _ask(FIRST_TURNS, rng, shown, [])
    messages = [_user(shown, question), {"role": "assistant", "content": answer}]
    pos = first
    for k in later:
        new = list(images[pos:pos + k])
        pos += k
        question, answer = _ask(LATER_TURNS, rng, new, shown)
        messages += [_user(new, question), {"role": "assistant", "content": answer}]
        shown += new
    return messages


def _user(images: Sequence[Caption], question: str) -> dict[str, Any]:
    return {"role": "user", "image_ids": [c.key for c in images], "content": question}


def _ask(kinds: Sequence[Callable], rng: random.Random, new: list[Caption], earlier: list[Caption]) -> Turn:
    for kind in rng.sample(list(kinds), len(kinds)):
        turn = kind(new, earlier, rng)
        if turn is not None:
            return turn
    raise AssertionError("a count question applies to any images with objects, so one always fits")


# Words


def _objects(caption: Caption) -> list[Mapping[str, Any]]:
    objects = (caption.scene or {}).get("objects")
    return [o for o in objects if isinstance(o, Mapping)] if isinstance(objects, list) else []


def _name(c: Caption) -> str:
    return f"IMAGE#{c.key}"


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _names(images: Sequence[Caption]) -> str:
    return _join([_name(c) for c in images])


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    return noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"


def _count(n: int, noun: str) -> str:
    if n == 0:
        return f"no {_plural(noun)}"
    return f"{number_word(n)} {noun if n == 1 else _plural(noun)}"


def _shape(o: Mapping[str, Any]) -> str:
    return str(o.get("shape", "shape"))


def _color(o: Mapping[str, Any]) -> str:
    return str(o.get("color", "plain"))


def _a(o: Mapping[str, Any]) -> str:
    words = " ".join(str(w) for w in (o.get("size"), o.get("color"), o.get("shape", "shape")) if w)
    return ("an " if words[0] in "aeiou" else "a ") + words


# First-turn questions: (new images, earlier images = [], rng) -> (question, answer), or None when it does not apply


def _count_color(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    color = rng.choice(sorted({_color(o) for c in new for o in _objects(c)}))
    return _count_across(new, f"{color} shape", lambda o: _color(o) == color)


def _count_shape(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    shape = rng.choice(sorted({_shape(o) for c in new for o in _objects(c)}))
    return _count_across(new, shape, lambda o: _shape(o) == shape)


def _count_across(images: list[Caption], noun: str, match: Callable, lead: str = "") -> Turn:
    counts = [sum(map(match, _objects(c))) for c in images]
    how = "how many" if lead else "How many"
    if len(images) == 1:
        found = [_a(o) for o in _objects(images[0]) if match(o)]
        answer = f"{_name(images[0])} has {_count(counts[0], noun)}" + (f": {_join(found)}." if found else ".")
        return f"{lead}{how} {_plural(noun)} are there in {_name(images[0])}?", answer
    each = "; ".join(f"{_name(c)} has {number_word(n) if n else 'none'}" for c, n in zip(images, counts))
    answer = f"There {'is' if sum(counts) == 1 else 'are'} {_count(sum(counts), noun)} in all: {each}."
    return f"{lead}{how} {_plural(noun)} can you find across {_names(images)}?", answer


def _most_shapes(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    if len(new) < 2:
        return None
    counts = {_name(c): len(_objects(c)) for c in new}
    top = max(counts.values())
    leaders = [name for name, n in counts.items() if n == top]
    others = "; ".join(f"{name} has {_count(n, 'shape')}" for name, n in counts.items() if n != top)
    if len(leaders) > 1:
        answer = f"{_join(leaders)} tie with {_count(top, 'shape')} each" + (f"; {others}." if others else ".")
    else:
        answer = f"{leaders[0]} holds the most, with {_count(top, 'shape')}; {others}."
    return f"Which of {_names(new)} holds the most shapes?", answer


def _left_to_right(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    objects = _objects(new[0])
    if len(new) != 1 or not all(isinstance(o.get("x"), (int, float)) for o in objects):
        return None
    ordered = sorted(objects, key=lambda o: o["x"])
    return (f"Going from left to right, which shapes do you see in {_name(new[0])}?",
            f"From left to right, {_name(new[0])} shows {_join([_a(o) for o in ordered])}.")


def _shared_colors(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    if len(new) < 2:
        return None
    palettes = [{_color(o) for o in _objects(c)} for c in new]
    shared = sorted(set.intersection(*palettes))
    where = f"both {_names(new)}" if len(new) == 2 else f"every one of {_names(new)}"
    if shared:
        answer = f"{_join(shared).capitalize()} {'appears' if len(shared) == 1 else 'appear'} in {where}."
    else:
        each = "; ".join(f"{_name(c)} has {_join(sorted(p))}" for c, p in zip(new, palettes))
        answer = f"No colour appears in {where}: {each}."
    return f"Which colours appear in {where}?", answer


def _background(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    background = (new[0].scene or {}).get("background")
    shapes = _count(len(_objects(new[0])), "shape")
    if len(new) == 1 and isinstance(background, str):  # a colour name
        return (f"What colour is the background of {_name(new[0])}, and how many shapes stand on it?",
                f"The background of {_name(new[0])} is {background}, with {shapes} on it.")
    kind = background.get("kind") if isinstance(background, Mapping) else None  # the shapes world's form
    if len(new) == 1 and isinstance(kind, str):
        return (f"What kind of background does {_name(new[0])} have, and how many shapes stand on it?",
                f"{_name(new[0])} has a {kind} background with {shapes} on it.")
    return None


# Later-turn questions: they name every new image and at least one earlier image


def _compare_count(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    ref = rng.choice(earlier)
    mine, theirs = sum(len(_objects(c)) for c in new), len(_objects(ref))
    subject = _names(new) + (" together" if len(new) > 1 else "")
    question = f"{'Does' if len(new) == 1 else 'Do'} {subject} have more shapes than {_name(ref)}?"
    if mine == theirs:
        return question, f"No, the same number: {subject} and {_name(ref)} have {_count(mine, 'shape')} each."
    return question, (f"{'Yes' if mine > theirs else 'No'}: {subject} {'has' if len(new) == 1 else 'have'} "
                      f"{_count(mine, 'shape')}, while {_name(ref)} has {_count(theirs, 'shape')}.")


def _shared_shapes(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    ref = rng.choice(earlier)
    mine = sorted({_shape(o) for c in new for o in _objects(c)})
    theirs = sorted({_shape(o) for o in _objects(ref)})
    shared = [s for s in mine if s in theirs]
    question = f"Which kinds of shape in {_names(new)} also appear in {_name(ref)}?"
    if shared:
        return question, f"{_names(new)} and {_name(ref)} share {_join([_plural(s) for s in shared])}."
    return question, (f"None: {_names(new)} {'shows' if len(new) == 1 else 'show'} "
                      f"{_join([_plural(s) for s in mine])}, while {_name(ref)} shows "
                      f"{_join([_plural(s) for s in theirs])}.")


def _running_total(new: list[Caption], earlier: list[Caption], rng: random.Random) -> Turn | None:
    color = rng.choice(sorted({_color(o) for c in new + earlier for o in _objects(c)}))
    lead = f"Taking {_names(new)} into account as well, "
    return _count_across(earlier + new, f"{color} shape", lambda o: _color(o) == color, lead)


FIRST_TURNS = (_count_shape, _most_shapes, _left_to_right, _shared_colors, _background, _count_color)
LATER_TURNS = (_compare_count, _shared_shapes, _running_total)
