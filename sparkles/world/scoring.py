"""The exact scorer: read what a free-text answer claims, compare it with the `Truth` made with its question.

Three readers, all over the world's own words (numbers as digits or words, colours, shapes, sizes, backgrounds,
IMAGE#k, true/false):
- `read_claims`: the words an answer names anywhere: images, numbers, colours, shapes, true/false;
- `read_objects`: the objects a caption claims, as a multiset of (shape, colour, size), and its background, so that
  "two small blue squares and a big red circle" equals "a big red circle and 2 small blue squares";
- `verdict`: where a worked answer gives its verdict, after describing each image on the way there.

Pure: no files, no torch. Scenes and their words are in `shapes.py`; questions and their truths in `tasks.py`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import InputError
from .shapes import BACKGROUNDS, COLORS, NUMBERS, SHAPES, SIZES, join, noun, number_word


@dataclass(frozen=True)
class Truth:
    """What one answer must claim; `score` reads it per kind. `tasks.py` makes these with its questions."""

    kind: str  # which, most, odd, bison | count, total | color, shape, share | caption | nlvr2
    answer: str  # the canonical answer: it always scores as correct
    images: tuple[str, ...] = ()  # which/most/odd/bison: the one label to name; others: the labels it may name
    count: int | None = None  # count, total; most: the winner's count
    words: tuple[str, ...] = ()  # color/shape/share: the word(s) to name; caption: one caption per image
    value: bool | None = None  # nlvr2


def truth_from_dict(data: Mapping[str, Any]) -> Truth:
    """The inverse of `dataclasses.asdict`, for truths read back from JSON."""
    return Truth(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
                    if k in Truth.__dataclass_fields__})


class Score(NamedTuple):
    correct: bool
    expected: str
    found: str | None  # what the answer claims, as the scorer read it; None when it claims nothing
    kind: str


class ObjectCounts(NamedTuple):
    """A caption's objects against the scene's, counting multiplicity: precision = matched / claimed, recall =
    matched / present. Sums of these over a set give micro-averaged precision and recall."""

    matched: int  # objects the caption claims that the scene has
    claimed: int  # objects the caption claims
    present: int  # objects the scene has


_IMAGE = re.compile(r"image\s*#\s*(\w+)", re.I)  # "IMAGE#2", "image #2"; \w+ keeps IMAGE#12 apart from IMAGE#1
_NUMBER_WORDS = {w: n for n, w in enumerate(NUMBERS)} | {"none": 0, "zero": 0}
_WORDS = {"number": re.compile(r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\b"),
          "color": re.compile(r"\b(" + "|".join(COLORS) + r")\b"),
          "shape": re.compile(r"\b(" + "|".join(SHAPES) + r")(?:e?s)?\b"),  # plurals read as the singular
          "value": re.compile(r"\b(true|false)\b")}


def read_claims(answer: str) -> dict[str, set]:
    """What an answer names: {"image": labels k of IMAGE#k, "number": ints, "color", "shape", "value": words}.

    Numbers are digits or words outside image names; "no", "none" and "zero" are 0; "a" is not a number.
    """
    text = answer.lower()
    rest = _IMAGE.sub(" ", text)
    claims = {name: set(pattern.findall(rest)) for name, pattern in _WORDS.items()}
    claims["number"] = {int(w) if w.isdigit() else _NUMBER_WORDS[w] for w in claims["number"]}
    return claims | {"image": {m.group(1) for m in _IMAGE.finditer(text)}}


# Captions: an object phrase is [number] [sizes and colours, in any order] shape[s]; "shape" stands for any shape.
_OBJECT = re.compile(r"\b(?:(an?|\d+|" + "|".join(_NUMBER_WORDS) + r")[\s,]+)?"
                     r"((?:(?:" + "|".join([*SIZES, *COLORS]) + r")[\s,]+)*)"
                     r"(" + "|".join([*SHAPES, "shape"]) + r")(e?s)?\b")
_BACKGROUND = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r")\b")
Key = tuple[str | None, str | None, str | None]  # (shape, colour, size); None where the phrase does not say one


def read_objects(text: str) -> tuple[Counter[Key], set[str]]:
    """The objects a text claims, with their counts, and the background kinds it names.

    "a"/"an" is one; a plural without a number is two, the least it can mean; "no" is none. A phrase without a
    size or colour, or with two of either, claims an object no scene has: it counts, and never matches.
    """
    text = _IMAGE.sub(" ", text.lower())  # IMAGE#2 is a name, not two of anything
    objects: Counter[Key] = Counter()
    for number, adjectives, shape, plural in _OBJECT.findall(text):
        n = (1 if number in ("a", "an") else int(number) if number.isdigit() else _NUMBER_WORDS[number]) \
            if number else 2 if plural else 1
        words = adjectives.replace(",", " ").split()
        sizes, colors = {w for w in words if w in SIZES}, {w for w in words if w in COLORS}
        key = (None if shape == "shape" else shape, _one(colors), _one(sizes))
        if n:
            objects[key] += n
    return objects, set(_BACKGROUND.findall(text))


def _one(words: set[str]) -> str | None:
    return next(iter(words)) if len(words) == 1 else None


def _said(objects: Counter[Key], backgrounds: set[str]) -> str:
    """What was read, in the caption's own words: "a big red circle and two small blue squares on a … background"."""
    phrases = [f"{'a' if n == 1 else number_word(n)} {noun(n, color=color, shape=shape, size=size)}"
               for (shape, color, size), n in objects.items()]
    ground = f" on a {'/'.join(sorted(backgrounds))} background" if backgrounds else ""
    return (join(phrases) or "nothing") + ground if phrases or backgrounds else ""


def _captions(truth: Truth, answer: str) -> list[tuple[str, str]]:
    """(canonical caption, what the answer says about that image) per image: the text after each mention of
    IMAGE#k up to the next image named, so that what is said of another image is not counted; with one image,
    also what comes before any image is named (all of an answer that names none)."""
    marks = list(_IMAGE.finditer(answer))
    said = dict.fromkeys(truth.images, answer[:marks[0].start()] if marks else answer) if len(truth.words) == 1 \
        else dict.fromkeys(truth.images, "")
    for mark, after in zip(marks, [*marks[1:], None]):
        if mark.group(1) in said:
            said[mark.group(1)] += " " + answer[mark.end():after.start() if after else len(answer)]
    return [(c, said[b]) for b, c in zip(truth.images, truth.words)]


def _caption_score(truth: Truth, answer: str) -> tuple[bool, ObjectCounts, str | None]:
    exact, counts, found = True, ObjectCounts(0, 0, 0), []
    for expected, text in _captions(truth, answer):
        (want, ground), (have, named) = read_objects(expected), read_objects(text)
        exact &= have == want and named == ground
        matched = sum((have & want).values())
        counts = ObjectCounts(counts.matched + matched, counts.claimed + have.total(), counts.present + want.total())
        found.append(_said(have, named))
    return exact, counts, " | ".join(found) if any(found) else None


def object_counts(truth: Truth, answer: str) -> ObjectCounts:
    """How the objects a caption answer claims compare with the scene's, over every image the truth describes."""
    if truth.kind != "caption":
        raise InputError(f"object_counts reads caption answers; this truth is a {truth.kind!r} one")
    return _caption_score(truth, answer)[1]


# Verdicts: a worked answer describes each image, then concludes; only the conclusion is its answer.
_ASKED = re.compile(r"\((?:image\s*#\s*1 or image\s*#\s*2|true or false)\)")  # the prompt's options, echoed
_MARKER = re.compile(r"\b(?:so|thus|hence|therefore|in conclusion)\b|\banswer\s*(?:is\b|:)")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")


def verdict(answer: str, options: Callable[[str], set]) -> str:
    """The part of `answer` that gives its verdict, where `options(text)` is the set of options a text names.

    An answer naming one option or none is all verdict: short answers read as they always have. One naming
    several (a worked answer, or a hedge) concludes after its last "so", "thus", "hence", "therefore", "in
    conclusion", "answer is" or "answer:", or else in its last sentence; that part must name exactly one option.
    """
    text = _ASKED.sub(" ", answer.lower())
    if len(options(text)) <= 1:
        return text
    marks = list(_MARKER.finditer(text))
    if marks:
        return text[marks[-1].end():]
    sentences = [s for s in _SENTENCE.split(text.strip()) if s.strip()]
    return sentences[-1] if sentences else text


# What a worked answer of each kind names on its way to the verdict, and so what makes `verdict` look for one.
_OPTIONS = {"bison": ("image",), "which": ("image",), "most": ("image",), "odd": ("image",), "nlvr2": ("value",),
            "count": ("number",), "total": ("number",), "share": ("color", "shape")}


def score(truth: Truth, answer: str) -> Score:
    """Check what `answer` claims against `truth`; case, punctuation and extra words do not matter.

    Images are named IMAGE#k or "image #k" (IMAGE#12 is not IMAGE#1). Negation is not understood: "not IMAGE#2"
    names IMAGE#2. Per kind:
    - which, most, odd, bison: exactly the right image is named (two images, or none, is wrong); a count given
      with "most" must be right.
    - count, total: exactly one number, the right one, and no image beyond those asked about.
    - color, shape, share: exactly the right colour (or shape) words, and no image beyond those asked about.
    - caption: for each image, the objects claimed (shape, colour, size, with counts, in any order) and the
      background are exactly the scene's; an image's description is what follows its IMAGE#k (see `_captions`).
    - nlvr2: exactly one of true/false.
    An answer of a kind that compares or counts is read at its `verdict` (`worked.py`: "IMAGE#1 shows …. IMAGE#2
    shows …. So IMAGE#2 has more red circles: two."); a bison or nlvr2 answer containing "therefore" is read as the
    original extractor reads it (spec §9.7), and one it cannot read is wrong.
    """
    kind, text = truth.kind, " ".join(answer.lower().split())
    if kind in ("bison", "nlvr2") and "therefore" in text:
        from ..eval.tasks.common import extract_option  # the original's extractor, kept with the BISON/NLVR2 tasks

        options = ("image#1", "image#2") if kind == "bison" else ("true", "false")
        expected = options[0] if (truth.images[0] == "1" if kind == "bison" else truth.value) else options[1]
        found = extract_option(text, options)
        return Score(found == expected, expected, found, kind)
    if kind in _OPTIONS:
        answer = verdict(answer, lambda t: set().union(*(read_claims(t)[k] for k in _OPTIONS[kind])))
    claims = read_claims(answer)
    inside = claims["image"] <= set(truth.images)
    if kind in ("which", "most", "odd", "bison"):
        ok = claims["image"] == {truth.images[0]} and (kind != "most" or claims["number"] <= {truth.count})
        return Score(ok, f"IMAGE#{truth.images[0]}", _listed(f"IMAGE#{x}" for x in claims["image"]), kind)
    if kind in ("count", "total"):
        return Score(claims["number"] == {truth.count} and inside, str(truth.count),
                     _listed(map(str, claims["number"])), kind)
    if kind in ("color", "shape", "share"):
        words = claims["color" if truth.words[0] in COLORS else "shape"]
        return Score(words == set(truth.words) and inside, truth.words[0], _listed(words), kind)
    if kind == "nlvr2":
        expected = str(truth.value).lower()
        return Score(claims["value"] == {expected}, expected, _listed(claims["value"]), kind)
    if kind == "caption":
        exact, _, found = _caption_score(truth, answer)
        return Score(exact, " | ".join(truth.words), found, kind)
    raise InputError(f"unknown truth kind {kind!r}; expected which, most, odd, bison, count, total, color, shape, "
                     "share, caption or nlvr2")


def _listed(claims) -> str | None:
    return ", ".join(sorted(claims)) or None
