"""SparklesEval: two-turn dialogues about several images, judged by a language model (spec §7.4, §9.2–9.5).

Reads DIR/annotations/sparkles_evaluation_sparkleseval_annotations.json and DIR/images/<image_id>.jpg. Turn 2 is
asked after the model's own turn-1 answer, as the original does. The judge prompt, its parsing and the final
score are the original's (`sparkles/judge.py`, `report.py`); here is what ties them to an item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import Any

from ...conversation import SLOT, Image, Message
from ...errors import InputError
from ...formats import from_sparkles_dialogue
from ..judge import sparkleseval_prompt
from .common import Example, Scored, read_annotations

ANNOTATIONS = "annotations/sparkles_evaluation_sparkleseval_annotations.json"
CRITERIA = ("C1", "C2", "C3")


@dataclass(frozen=True)
class SparklesEval:
    items: tuple[Example, ...]
    name: str = "sparkleseval"
    metric: str = "score"
    legacy_name: str = "SparklesEval"

    def examples(self) -> Sequence[Example]:
        return self.items

    def judge_prompt(self, example: Example, answers: Sequence[str]) -> str:
        dialogue = example.record["dialogue"]
        # The judge sees the annotation's own image dicts, written with str() as the original formats them.
        images = list(dialogue[0].get("images", [])) + list(dialogue[2].get("images", []))
        return sparkleseval_prompt(images, dialogue[0]["content"].replace(SLOT, ""), answers[0],
                                   dialogue[2]["content"].replace(SLOT, ""), answers[1])

    def score(self, example: Example, answers: Sequence[str], judgment: Any = None) -> Scored:
        """Per turn the mean of C1–C3; the item's value is the mean of the two turns (spec §9.5)."""
        if judgment is None or judgment.status != "ok":
            return Scored(None, parsed=False)
        first, second = judgment.parsed["A1_C123_scores"], judgment.parsed["A2_C123_scores"]
        parts = {f"{c}_{turn}": scores[k + 1] for turn, scores in ((1, first), (2, second))
                 for k, c in enumerate(CRITERIA)}
        parts |= {"judge_A1": first[0], "judge_A2": second[0]}  # the judge's own overall ratings: kept, unused
        return Scored((fmean(first[1:]) + fmean(second[1:])) / 2, parts=parts)

    def legacy_record(self, example: Example, answers: Sequence[str], scored: Scored,
                      judgment: Any = None) -> dict[str, Any]:
        """The original's result item: the dialogue with the model's answers, and the judge's object.

        A judgment that failed gets no judge object: the original's code reads four numbers from every one it
        finds. Its raw replies stay in results.jsonl, and the report leaves the item out of the original's file."""
        dialogue = [dict(m) for m in example.record["dialogue"]]
        for k, answer in zip((1, 3), answers):
            dialogue[k]["content"] = answer
        out: dict[str, Any] = {"dialogue": dialogue, "evaluation_id": example.record["evaluation_id"]}
        if judgment is not None and judgment.status == "ok":
            out[judgment.model] = {"A1_C123_scores": judgment.parsed["A1_C123_scores"],
                                   "A2_C123_scores": judgment.parsed["A2_C123_scores"],
                                   "prompt": judgment.prompt, "response": judgment.response}
        return out


def example(item: dict[str, Any], images: Path) -> Example:
    """One item as an example of two turns; each image's file is DIR/images/<image_id>.jpg."""
    conversation = from_sparkles_dialogue(item)
    roles = [m.role for m in conversation.messages]
    if roles != ["user", "assistant", "user", "assistant"]:
        raise InputError(f"SparklesEval item {item['evaluation_id']}: expected 4 messages (user, assistant, user, "
                         f"assistant), got {roles}")

    def located(message: Message) -> Message:
        parts = tuple(replace(p, source=str(images / f"{p.image_id}.jpg")) if isinstance(p, Image) else p
                      for p in message.parts)
        return Message("user", parts)

    turns = (located(conversation[0]), located(conversation[2]))
    return Example(str(item["evaluation_id"]), turns, record=item)


def load(root: str | Path) -> SparklesEval:
    root = Path(root)
    return SparklesEval(tuple(example(item, root / "images") for item in read_annotations(root / ANNOTATIONS)))


def references(example: Example) -> tuple[str, str]:
    """The annotation's own (GPT-4) answers: judging them gives the original's reference score (9.26)."""
    dialogue = example.record["dialogue"]
    return dialogue[1]["content"], dialogue[3]["content"]
