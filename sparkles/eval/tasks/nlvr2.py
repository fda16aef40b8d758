"""NLVR2 as SparklesChat evaluates it: is a statement true of a left and a right image (spec §7.6, §9.6)?

Reads DIR/annotations/sparkles_evaluation_nlvr2_annotations.json; the images of identifier `test1-87-0-1` are
DIR/images/test1-87-0-img0.png (left, IMAGE#1) and …-img1.png (right, IMAGE#2). Prompt verbatim, answers read
with the original's extractor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...conversation import Image, Message, parse_markup
from ...errors import InputError
from .common import Example, PairTask, read_annotations

ANNOTATIONS = "annotations/sparkles_evaluation_nlvr2_annotations.json"
OPTIONS = ("TRUE", "FALSE")
PROMPT = """Carefully examine a pair of images: the left IMAGE#1<Img><ImageHere></Img> and the right IMAGE#2<Img><ImageHere></Img>.
Determine whether the following statement is true about the pair of images:
'{}'
Jointly reasoning about the statement grounded in IMAGE#1 and IMAGE#2.
The task requires compositional joint reasoning, including about quantities, comparisons, and relations. Let's think step by step.
Please start your response with "Let's think step by step." and end with "Therefore, the answer (TRUE or FALSE) is"."""  # noqa: E501


def example(item: dict[str, Any], images: Path) -> Example:
    """One annotation item as an example; the label is "True" or "False" as the file has it."""
    where = f"NLVR2 item {item.get('evaluation_id')}"
    identifier, sentence, label = item.get("identifier"), item.get("sentence"), item.get("label")
    if not isinstance(identifier, str) or len(identifier) < 3 or not isinstance(sentence, str):
        raise InputError(f"{where}: expected an identifier like 'test1-87-0-1' and a sentence, got "
                         f"{identifier!r} and {sentence!r:.40}")
    if str(label).lower() not in ("true", "false"):
        raise InputError(f"{where}: label must be 'True' or 'False', got {label!r}")
    stem = identifier[:-2]  # the original drops the last two characters: the pair's index, not the image's
    prompt = PROMPT.format(sentence)
    parts = parse_markup(prompt, [Image(source=str(images / f"{stem}-img{k}.png")) for k in (0, 1)])
    record = {"label": label, "prompt": prompt, "sentence": sentence, "evaluation_id": item["evaluation_id"]}
    return Example(str(item["evaluation_id"]), (Message("user", parts),), target=str(label).lower(), record=record)


def load(root: str | Path, *, extractor: str = "legacy") -> PairTask:
    root = Path(root)
    items = tuple(example(item, root / "images") for item in read_annotations(root / ANNOTATIONS))
    return PairTask(items, OPTIONS, name="nlvr2", legacy_name="NLVR2", extractor=extractor)
