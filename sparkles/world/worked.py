"""Worked answers: first what each image the question is about shows, then the verdict ("So …"), as a person works a
comparison out and as the original BISON/NLVR2 prompts ask ("Let's think step by step"). A small model describes
one image far more surely than it compares two in one step (issue 10: 83 % exact captions, BISON at chance), so
the world's training answers may take this form: the looking is done one image at a time, and the verdict is read
off the descriptions it has just written. `scoring.verdict` reads such answers.

Pure: scenes in, text out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from .shapes import Scene, caption, count, noun, number_word

# The question kinds whose worked answer describes the images first; a colour, a shape or a description is already
# one look at one image.
WORKED_KINDS = frozenset({"count", "total", "which", "most", "odd", "share", "bison", "nlvr2"})
_NAMED = re.compile(r"IMAGE#(\d+)")


def described(scenes: Mapping[str, Scene], labels: Iterable[str]) -> str:
    """"IMAGE#1 shows <caption>. IMAGE#2 shows <caption>." for the given labels."""
    return " ".join(f"IMAGE#{b} shows {caption(scenes[b])}." for b in labels)


def conclusion(answer: str) -> str:
    """The short answer as the last step: "So IMAGE#2 has more red circles: two.", "So true."."""
    return "So " + (answer if answer.startswith("IMAGE#") else answer[:1].lower() + answer[1:])


def about(question: str, earlier: Sequence[str]) -> list[str]:
    """The images a question is about: those it names, and every earlier one when it asks about "the images we
    discussed"; in their order."""
    labels = set(_NAMED.findall(question)) | (set(earlier) if "images we discussed" in question else set())
    return sorted(labels, key=int)


def dialogue(answer: str, scenes: Mapping[str, Scene], question: str, earlier: Sequence[str]) -> str:
    """The worked form of a dialogue turn's short `answer`."""
    return f"{described(scenes, about(question, earlier))} {conclusion(answer)}"


def bison(pair: tuple[Scene, Scene], text: str, label: str) -> str:
    """Each image's caption, held against the one asked about right after it is written; then the match."""
    said = [f"IMAGE#{k} shows {c}, {'as the caption says' if c == text else 'unlike the caption'}."
            for k, c in enumerate(map(caption, pair), start=1)]
    return " ".join(said) + f" So IMAGE#{label} matches it."


def nlvr2(pair: tuple[Scene, Scene], attr: Mapping[str, str] | None, value: bool) -> str:
    """Both captions; then, for a statement that counts something, how many of it each side has; then the value.
    `attr` is what the statement counts (`shapes.claim`), None for a statement about backgrounds."""
    facts = ""
    if attr is not None:
        left, right = (count(scene, **attr) for scene in pair)
        facts = (f" The left image has {number_word(left)} {noun(left, **attr)} and the right image has "
                 f"{number_word(right)} {noun(right, **attr)}.")
    return f"{described(dict(zip('12', pair)), '12')}{facts} So {'true' if value else 'false'}."


def steps(pair: tuple[Scene, Scene]) -> str:
    """The reasoning the original prompts ask for, up to its last words: each image's caption, then the verdict."""
    return f"Let's think step by step. {described(dict(zip('12', pair)), '12')} Therefore, the answer"
