"""BISON as SparklesChat evaluates it: pick which of two images matches a caption (spec §7.5, §9.6).

Reads DIR/annotations/sparkles_evaluation_bison_annotations.json and DIR/images/<image_filename>. The prompt is
the original's, verbatim; answers are read with the original's extractor (`common.extract_option`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...conversation import Image, Message, parse_markup
from ...errors import InputError
from .common import Example, PairTask, read_annotations

ANNOTATIONS = "annotations/sparkles_evaluation_bison_annotations.json"
OPTIONS = ("IMAGE#1", "IMAGE#2")
PROMPT = """Carefully examine the two similar images of IMAGE#1<Img><ImageHere></Img> and IMAGE#2<Img><ImageHere></Img>.
Given the following caption, you must select which of two images best matches the caption.
The caption is: '{}'.
This task requires fine-grained visual reasoning between the caption and each image. Let's think step by step.
Please start your response with "Let's think step by step." and end with "Therefore, the answer (IMAGE#1 or IMAGE#2) is"."""  # noqa: E501


def example(item: dict[str, Any], images: Path) -> Example:
    """One annotation item as an example: IMAGE#1 is candidate 0, IMAGE#2 candidate 1."""
    where = f"BISON item {item.get('evaluation_id')}"
    try:
        caption, true_id, candidates = item["caption"], item["true_image_id"], item["image_candidates"]
        files = [c["image_filename"] for c in candidates]
        first_id = candidates[0]["image_id"]
    except (KeyError, TypeError, IndexError) as e:
        raise InputError(f"{where}: expected caption, true_image_id and image_candidates [{{image_id, "
                         f"image_filename}}, …], missing {e}") from None
    if len(files) != 2:
        raise InputError(f"{where}: expected 2 image candidates, got {len(files)}")
    prompt = PROMPT.format(caption)
    label = "IMAGE#1" if true_id == first_id else "IMAGE#2"
    parts = parse_markup(prompt, [Image(source=str(images / f), image_id=c["image_id"]) for f, c in
                                  zip(files, candidates)])
    record = {"label": label, "prompt": prompt, "sentence": caption, "evaluation_id": item["evaluation_id"]}
    return Example(str(item["evaluation_id"]), (Message("user", parts),), target=label.lower(), record=record)


def load(root: str | Path, *, extractor: str = "legacy") -> PairTask:
    root = Path(root)
    items = tuple(example(item, root / "images") for item in read_annotations(root / ANNOTATIONS))
    return PairTask(items, OPTIONS, name="bison", legacy_name="BISON", extractor=extractor)
