"""The evaluation task protocol: examples as user turns, pure scoring, and the original's BISON/NLVR2 extractor.

A task reads its data folder once, when it is built (see each task module); everything here is then pure: the
conversation a model sees at each turn, what a judge is asked, how answers score, and the original's result-file
record. Running a task against a model is `sparkles/evaluate.py`; judging is `sparkles/judge.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ...conversation import Conversation, Image, Message, Text
from ...errors import InputError


@dataclass(frozen=True)
class Example:
    """One evaluation item: the user's turns, asked one after another, each after the model's previous answers."""

    id: str  # a stable key: resume, shards and merges match items by it (the original's evaluation_id)
    turns: tuple[Message, ...]  # one user message per turn; images are parts whose source is their file
    target: str | None = None  # the expected answer of an exactly scored task ("image#1", "true"); None if judged
    record: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the source record, for result files

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(p for m in self.turns for p in m.parts if isinstance(p, Image))


@dataclass(frozen=True)
class Scored:
    """How one item scored. The report averages `value` over items and each of `parts` by name."""

    value: float | None  # 1.0 / 0.0 for exact tasks, the 1–10 turn mean for judged ones; None when unscored
    parsed: bool = True  # the answer (exact tasks) or the judgment (judged tasks) could be read
    prediction: str | None = None  # what the answer says, e.g. "image#1"; None when it could not be read
    parts: Mapping[str, float] = field(default_factory=dict)  # e.g. {"C1_1": 9.0, …} per criterion and turn


@runtime_checkable
class Task(Protocol):
    """An evaluation: examples, and pure functions that score answers.

    An exactly scored task (BISON, NLVR2, the shapes world) returns None from `judge_prompt` and scores in
    `score(example, answers)`; a judged task (SparklesEval) returns the judge's prompt, and `score` reads the
    judge's parsed reply from `judgment` (a `judge.Judgment`, or None when it failed).
    """

    name: str  # the subcommand and file stem: "bison"
    metric: Literal["accuracy", "score"]  # the headline of summary.json
    legacy_name: str  # the original's dataset name in result file names: "BISON"

    def examples(self) -> Sequence[Example]: ...

    def judge_prompt(self, example: Example, answers: Sequence[str]) -> str | None: ...

    def score(self, example: Example, answers: Sequence[str], judgment: Any = None) -> Scored: ...

    def legacy_record(self, example: Example, answers: Sequence[str], scored: Scored,
                      judgment: Any = None) -> dict[str, Any]: ...


def conversation_for(example: Example, answers: Sequence[str]) -> Conversation:
    """What the model sees at turn len(answers)+1: every earlier turn with the model's own answer, then the next."""
    if len(answers) >= len(example.turns):
        raise InputError(f"item {example.id} has {len(example.turns)} turns; all {len(answers)} are answered")
    messages: list[Message] = []
    for turn, answer in zip(example.turns, answers):
        messages += [turn, Message("assistant", (Text(answer),))]
    return Conversation((*messages, example.turns[len(answers)]))


def sort_key(example_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order (the original sorts with int()), then any others by text."""
    return (0, int(example_id), "") if example_id.lstrip("-").isdigit() else (1, 0, example_id)


def read_annotations(path: Path) -> list[dict[str, Any]]:
    """A task's annotation file: a JSON list of objects, each with an evaluation_id."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no annotation file at {path}; expected the original layout DIR/annotations/*.json "
                         "with images in DIR/images/") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise InputError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        if "evaluation_id" not in item:
            raise InputError(f"{path}, item {i}: missing 'evaluation_id' (it has: {', '.join(item)})")
    return sorted(data, key=lambda item: sort_key(str(item["evaluation_id"])))


# Answer extraction for two-option tasks, as the original does it (spec §9.7), with its quirks kept in "legacy"
# mode; "strict" mode lets an explicit "the answer is <option>" win over whichever option is written first.

_ENDS = (",", ".", ":", " because")  # what may follow "the answer is <option>" for it to count as stated


def extract_option(response: str, options: tuple[str, str], *,
                   mode: Literal["legacy", "strict"] = "legacy") -> str | None:
    """The option a free-text answer ends on (lower-cased), or None when it cannot be read."""
    first, second = (o.lower() for o in options)
    text = response.lower()
    if "therefore" not in text:
        return None
    text = text[text.rfind("therefore") + len("therefore"):].strip()
    # The same rewrites in the same order as the original: "image #2" must be joined before the image form of
    # "answer (… or …) is" can match, and only "not <first option>" is understood.
    text = text.replace("answer (true or false) is", "answer is")
    text = text.replace("image #1", "image#1").replace("image #2", "image#2")
    text = text.replace("answer (image#1 or image#2) is", "answer is")
    text = text.replace(f"not {first}", second)
    stated = [o for o in (first, second) for end in _ENDS if f"the answer is {o}{end}" in text]
    if not stated and first in text and second in text:
        return None
    if mode == "strict" and stated:
        return max(stated, key=lambda o: max(text.rfind(f"the answer is {o}{end}") for end in _ENDS))  # the last
    positions = {o: text.find(o) for o in (first, second) if o in text}
    return min(positions, key=positions.get) if positions else None


def exact_score(example: Example, answer: str, options: tuple[str, str], mode: str = "legacy") -> Scored:
    """1.0 when the extracted option is the target, 0.0 otherwise; an unreadable answer is wrong and unparsed."""
    prediction = extract_option(answer, options, mode=mode)
    correct = prediction is not None and prediction == (example.target or "").lower()
    return Scored(float(correct), parsed=prediction is not None, prediction=prediction)


# What an unreadable answer predicts in the original's result file. The original resamples until it can read one,
# so its code calls `predict.lower()` on every record: null would crash it. No label equals this word, so its
# accuracy counts the answer as wrong, as our summary does (our results.jsonl keeps `prediction: null`).
UNREADABLE = "unreadable"


def pair_record(example: Example, answer: str, scored: Scored) -> dict[str, Any]:
    """The original's BISON/NLVR2 result record (spec §7.7); `predict` is UNREADABLE where the original would
    resample."""
    return {"label": example.record["label"], "prompt": example.record["prompt"],
            "img_paths": [str(Path(i.source).resolve()) for i in example.images],
            "predict": scored.prediction if scored.prediction is not None else UNREADABLE,
            "response": answer, "sentence": example.record["sentence"],
            "evaluation_id": example.record["evaluation_id"]}


@dataclass(frozen=True)
class PairTask:
    """BISON and NLVR2: one turn about two images, scored exactly by reading which option the answer gives."""

    items: tuple[Example, ...]
    options: tuple[str, str]  # what the extractor looks for, e.g. ("image#1", "image#2") or ("true", "false")
    name: str  # the subcommand and file stem: "bison"
    legacy_name: str  # the original's dataset name in result file names: "BISON"
    extractor: str = "legacy"  # "legacy" (the original's) or "strict" (see extract_option)
    metric: str = "accuracy"

    def examples(self) -> Sequence[Example]:
        return self.items

    def judge_prompt(self, example: Example, answers: Sequence[str]) -> None:
        return None

    def score(self, example: Example, answers: Sequence[str], judgment: Any = None) -> Scored:
        return exact_score(example, answers[0], self.options, self.extractor)

    def legacy_record(self, example: Example, answers: Sequence[str], scored: Scored,
                      judgment: Any = None) -> dict[str, Any]:
        return pair_record(example, answers[0], scored)
