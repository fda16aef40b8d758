"""Training records read from files: SparklesDialogue dialogues and per-turn files, LLaVA JSON, image–caption
pairs, text-only instructions and our own JSONL conversations, all turned into `Sample`s.

A bad record (malformed, or naming an image that is not on disk) is skipped and counted with its file and index,
or fails the run when `strict`; it never reaches a data-loader worker. Pixels are not read here: `data.py` loads
them per batch.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .. import formats
from ..config import DataSource, Kind
from ..conversation import Conversation, Image, Message, parse_markup, validate
from ..errors import InputError
from ..registry import Registry

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".webp")
# The original's four alignment prompts (spec §4.3), with the image named as everywhere else in Sparkles.
CAPTION_PROMPTS = ("IMAGE#1<Img><ImageHere></Img> Describe this image in detail.",
                   "IMAGE#1<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
                   "IMAGE#1<Img><ImageHere></Img> Please provide a detailed description of the picture.",
                   "IMAGE#1<Img><ImageHere></Img> Could you describe the contents of this image for me?")

# prefix -> factory(name, seed) of a sequence of samples made on the fly rather than read from a file
STREAMS: Registry = Registry("sample stream", {"world": "sparkles.world.data"})


@dataclass(frozen=True)
class Sample:
    conversation: Conversation  # image parts carry a resolved `source`, no pixels yet
    loss_on: Literal["last", "all"]
    origin: str  # "file.json#12": where the sample came from, for messages


@dataclass
class ReadReport:
    path: str
    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few skips, with their origin

    def skip(self, origin: str, reason: str) -> None:
        self.skipped[reason.split(":")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{origin}: {reason}")

    def summary(self) -> str:
        lost = sum(self.skipped.values())
        text = f"{self.path}: {self.records} records -> {self.samples} samples"
        return text + (f"; {lost} skipped ({'; '.join(self.examples)})" if lost else "")


def read_source(source: DataSource, *, strict: bool = False, seed: int = 0,
                max_images: int | None = None) -> tuple[list[Sample], ReadReport]:
    """All samples of one file, the bad records skipped (or raised, with `strict`) and reported; a sample with more
    image slots than `max_images` (the model's limit) is one of them.

    A path ``<stream>:<name>`` names a registered stream instead of a file: ``world:<kind>`` (caption, dialogue,
    bison, nlvr2) is an endless stream of shapes-world items drawn on the fly from `seed`.
    """
    prefix, colon, name = source.path.partition(":")
    if colon and prefix in STREAMS:
        samples = STREAMS.get(prefix)(name, seed)
        return samples, ReadReport(source.path, records=len(samples), samples=len(samples))
    path = Path(source.path)
    records = read_records(path)
    kind = source.kind if source.kind != "auto" else detect_kind(records, path)
    root = Path(source.images) if source.images else _default_root(path)
    report = ReadReport(str(path), records=len(records))
    samples: list[Sample] = []
    for i, record in enumerate(records):
        origin = f"{path.name}#{i}"
        try:
            found = list(_conversations(kind, record, i, source.loss_on))
            if not found:
                raise InputError("no complete turn: a user message followed by an assistant answer")
            for conversation, loss_on in found:
                conversation = _resolve_images(validate(conversation, allow_open=False), root)
                if max_images is not None and len(conversation.slots) > max_images:
                    raise InputError(f"too many images: {len(conversation.slots)}, the model takes at most "
                                     f"{max_images} per conversation")
                samples.append(Sample(conversation, loss_on, origin))
        except InputError as e:
            if strict:
                raise InputError(f"{origin}: {e}") from None
            report.skip(origin, str(e))
    report.samples = len(samples)
    return samples, report


def read_records(path: Path) -> list[Any]:
    """A JSON list (or one object, or the original's {"annotations": [...]}) or JSON Lines; a broken line becomes
    an `InputError` in its place, so the other records still count."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read training data {path}: {e.strerror}") from None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                             "JSON Lines files need a .jsonl name") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            return data["annotations"]  # the original's caption files: {"annotations": [...]}
        return data if isinstance(data, list) else [data]
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(InputError(f"line {n} is not valid JSON ({e.msg} at column {e.colno})"))
    return records


def detect_kind(records: list[Any], path: Path) -> Kind:
    first = next((r for r in records if isinstance(r, dict)), None)
    keys = set(first or {})
    for kind, needed in (("sparkles", {"dialogue"}), ("sparkles_turns", {"instruction", "tgt_imgs"}),
                         ("llava", {"conversations"}), ("jsonl", {"messages"}), ("captions", {"caption"}),
                         ("text", {"instruction", "output"})):
        if needed <= keys:
            return kind  # type: ignore[return-value]
    raise InputError(f"{path}: cannot tell what kind of training data this is from its keys {sorted(keys)}; "
                     "name it with kind=sparkles|sparkles_turns|llava|captions|text|jsonl")


def _default_root(path: Path) -> Path:
    """Where images are when no folder is named: DIR/images beside the file, or beside its annotations/ folder
    (the original's layout, DIR/annotations/x.json with DIR/images/), else the file's own folder."""
    for candidate in (path.parent / "images", path.parent.parent / "images"):
        if candidate.is_dir() and (candidate.parent == path.parent or path.parent.name == "annotations"):
            return candidate
    return path.parent


def _conversations(kind: Kind, record: Any, index: int, loss_on: str):
    """Yield (conversation, loss_on) pairs for one record."""
    if isinstance(record, Exception):
        raise InputError(str(record))
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}")
    if kind == "sparkles":
        conversation = formats.from_sparkles_dialogue(record)
        if loss_on == "all":
            yield conversation, "all"
            return
        # As the original: each turn is its own sample, with loss on that turn's answer only.
        for end in range(2, len(conversation.messages) + 1, 2):
            yield replace(conversation, messages=conversation.messages[:end]), "last"
    elif kind == "sparkles_turns":
        yield _from_turn_record(record), "last"
    elif kind == "llava":
        yield formats.from_llava(record), loss_on
    elif kind == "jsonl":
        yield formats.from_openai(_field(record, "messages", list)), loss_on
    elif kind == "captions":
        yield _from_caption(record, index), "last"
    elif kind == "text":
        prompt = "\n\n".join(x for x in (_field(record, "instruction", str), record.get("input") or "") if x)
        yield Conversation((Message.text_only("user", prompt),
                            Message.text_only("assistant", _field(record, "output", str)))), "last"


def _from_turn_record(record: dict) -> Conversation:
    """A per-turn file record (spec §7.2): the `instruction` holds every earlier turn, `answer` the target."""
    instruction = _field(record, "instruction", str)
    answer = record.get("fix_answer") or _field(record, "answer", str)
    images = [Image(label=str(i["image_id"]), image_id=i["image_id"], caption=i.get("caption"))
              for i in _field(record, "tgt_imgs", list)]
    turns = [t for t in instruction.split("###") if t.strip()]
    messages, slot = [], 0
    for turn in turns:
        role, _, text = turn.partition(": ")
        if role not in ("Human", "Assistant"):
            raise InputError(f"instruction turn {turn[:30]!r} is neither 'Human: …' nor 'Assistant: …'")
        if role == "Human":
            n = _slots_in(text)
            messages.append(Message("user", parse_markup(text, images[slot:slot + n])))
            slot += n
        else:
            messages.append(Message.text_only("assistant", text.strip()))
    if slot != len(images):
        raise InputError(f"the instruction has {slot} image slots but tgt_imgs lists {len(images)} images")
    if messages and messages[-1].role == "assistant" and not messages[-1].parts:
        messages.pop()  # the instruction ends with the open "###Assistant: " that the answer fills
    return Conversation(tuple(messages) + (Message.text_only("assistant", answer),))


def _slots_in(text: str) -> int:
    return sum(1 for p in parse_markup(text) if isinstance(p, Image))


def _from_caption(record: dict, index: int) -> Conversation:
    source = record.get("image") or record.get("file")
    if source is None and record.get("image_id") is None:
        raise InputError("a caption record needs 'image', 'file' or 'image_id'")
    prompt = CAPTION_PROMPTS[index % len(CAPTION_PROMPTS)]  # deterministic, and all four get used
    image = Image(source=source, image_id=record.get("image_id"))
    return Conversation((Message("user", parse_markup(prompt, [image])),
                         Message.text_only("assistant", _field(record, "caption", str))))


def _field(record: dict, key: str, kind: type) -> Any:
    if not isinstance(record.get(key), kind):
        got = type(record.get(key)).__name__
        raise InputError(f"missing or malformed {key!r}: expected {kind.__name__}, got {got}")
    return record[key]


def _resolve_images(conversation: Conversation, root: Path) -> Conversation:
    """Give every image part an existing file path: its source under `root`, or `root/<image_id>.<ext>`."""

    def resolve(part):
        if not isinstance(part, Image) or (part.source or "").startswith(("data:", "http://", "https://")):
            return part
        return replace(part, source=str(_find_image(part, root)))

    messages = tuple(Message(m.role, tuple(resolve(p) for p in m.parts)) for m in conversation.messages)
    return replace(conversation, messages=messages)


def _find_image(image: Image, root: Path) -> Path:
    if image.source:
        path = Path(image.source)
        path = path if path.is_absolute() else root / path
        if path.is_file():
            return path
        raise InputError(f"image not found: {path}")
    stem = image.image_id if image.image_id is not None else image.label
    for suffix in IMAGE_SUFFIXES:
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    raise InputError(f"image not found: {root / str(stem)}.jpg (nor .png/.jpeg/.webp)")
