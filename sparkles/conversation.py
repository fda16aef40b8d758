"""Conversations: messages made of text and image parts, and the IMAGE#k names that tie them together.

A conversation is a tuple of messages; a message is a role and a tuple of parts, each `Text` or `Image`. Images
are numbered in order of first appearance across the whole conversation. An image part is a *slot*: the place
where the image's tokens go. Later turns refer back to an image by writing its name, ``IMAGE#k``, in plain text.

No torch here, and no file access: `image.py` loads pixels, `formats.py` reads and writes other formats.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import InputError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# The SparklesChat markup of one image slot, and the word-level reference that names an image.
SLOT = "<Img><ImageHere></Img>"
PLACEHOLDER = "<image>"
IMAGE_REF = re.compile(r"IMAGE#(\w+(?:-\w+)*)")  # ids like 2330601, 3 or w7-000123
# `IMAGE#k<Img><ImageHere></Img>` names and places an image; a bare slot places one without a name.
_MARKUP = re.compile(r"(?:IMAGE#(\w+(?:-\w+)*))?" + re.escape(SLOT))


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    """One image slot.

    `label` is the name the text uses for the image (``IMAGE#<label>``); None is a bare slot that shows an image
    without naming it (the original's single-image prompts). Two slots with the same label show the same image.
    """

    label: str | None = None
    source: str | None = None  # path, data: URI or URL the pixels come from, when known
    pixels: Any = field(default=None, compare=False, repr=False)  # a loaded RGB PIL image, or None
    sha256: str | None = field(default=None, compare=False)  # content hash of the pixels' source bytes
    caption: str | None = None  # a description of the image, as datasets carry it
    image_id: str | int | None = None  # the id in the source dataset, kept with its type for lossless round trips

    @property
    def name(self) -> str:
        return f"IMAGE#{self.label}" if self.label is not None else "<unnamed image>"


Part = Text | Image


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...] = ()

    @staticmethod
    def text_only(role: Role, text: str) -> Message:
        return Message(role, (Text(text),) if text else ())

    @property
    def text(self) -> str:
        """The text with each image written as SparklesChat markup (see `to_markup`)."""
        return to_markup(self.parts)

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(p for p in self.parts if isinstance(p, Image))


@dataclass(frozen=True)
class Conversation:
    """Messages plus the fields of the source record that are not messages (ids, raw teacher output…)."""

    messages: tuple[Message, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __iter__(self):
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, i):
        return self.messages[i]

    def append(self, message: Message) -> Conversation:
        return replace(self, messages=self.messages + (message,))

    @property
    def slots(self) -> tuple[Image, ...]:
        """Every image part, in order: each one becomes K image tokens."""
        return tuple(p for m in self.messages for p in m.parts if isinstance(p, Image))

    @property
    def images(self) -> tuple[Image, ...]:
        """Distinct images in order of first appearance; a labelled image shown twice counts once."""
        seen: set[str] = set()
        out = []
        for image in self.slots:
            if image.label is None or image.label not in seen:
                out.append(image)
            if image.label is not None:
                seen.add(image.label)
        return tuple(out)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(i.label for i in self.images if i.label is not None)


def parse_markup(text: str, images: Sequence[Image] = ()) -> tuple[Part, ...]:
    """Split SparklesChat markup (``IMAGE#k<Img><ImageHere></Img>``) into text and image parts.

    `images` supplies what is known of each slot (source, caption…) in slot order; a slot's label comes from the
    text. Too few or too many `images` for the slots is an `InputError`.
    """
    parts: list[Part] = []
    slots = list(_MARKUP.finditer(text))
    if images and len(images) != len(slots):
        raise InputError(f"image slots in the text: {len(slots)}, images given: {len(images)}")
    pos = 0
    for i, m in enumerate(slots):
        if m.start() > pos:
            parts.append(Text(text[pos : m.start()]))
        base = images[i] if images else Image()
        parts.append(replace(base, label=m.group(1)))
        pos = m.end()
    if pos < len(text):
        parts.append(Text(text[pos:]))
    return tuple(parts)


def to_markup(parts: Iterable[Part]) -> str:
    """The inverse of `parse_markup`."""
    out = []
    for p in parts:
        if isinstance(p, Text):
            out.append(p.text)
        else:
            out.append((f"IMAGE#{p.label}" if p.label is not None else "") + SLOT)
    return "".join(out)


def user_message(text: str, images: Sequence[Image], *, known: Sequence[str] = ()) -> Message:
    """Build a user message from a prompt and the images it brings, placing each image where the prompt says.

    The new images are named after the `known` labels: with two images already in the conversation, they are
    IMAGE#3, IMAGE#4, … The prompt places them with ``<image>`` (one per new image, in order), or by naming them:
    the first mention of a new ``IMAGE#k`` becomes its slot. New images the prompt neither places nor names go
    first, in order. A mention of an image the conversation does not have is an `InputError`.
    """
    labels = [str(len(known) + i + 1) for i in range(len(images))]
    named = [replace(img, label=label) for img, label in zip(images, labels)]
    check_references(text, [*known, *labels])
    pieces = text.split(PLACEHOLDER)
    if len(pieces) > 1:
        if len(pieces) - 1 != len(named):
            raise InputError(f"the prompt has {len(pieces) - 1} {PLACEHOLDER} placeholders but {len(named)} new "
                             f"images were given: use one {PLACEHOLDER} per new image, in order")
        parts: list[Part] = []
        for piece, image in zip(pieces, [*named, None]):
            parts.extend([Text(piece)] if piece else [])
            parts.extend([image] if image is not None else [])
        return Message("user", tuple(parts))
    return Message("user", _place_at_mentions(text, named))


def _place_at_mentions(text: str, images: Sequence[Image]) -> tuple[Part, ...]:
    """Put each image's slot at the first ``IMAGE#k`` mention of it; images never mentioned go first."""
    by_label = {img.label: img for img in images}
    parts: list[Part] = []
    pos = 0
    for m in IMAGE_REF.finditer(text):
        image = by_label.pop(m.group(1), None)
        if image is None:
            continue  # an earlier image, or a second mention: stays plain text
        if m.start() > pos:
            parts.append(Text(text[pos : m.start()]))
        parts.append(image)
        pos = m.end()
    if pos < len(text):
        parts.append(Text(text[pos:]))
    leading: list[Part] = []
    for image in by_label.values():  # dicts keep insertion order, so these stay in upload order
        leading += [image, Text(" ")]
    if leading and not parts:
        leading.pop()
    return tuple(leading + parts)


def check_references(text: str, labels: Sequence[str]) -> None:
    """Raise `InputError` when `text` names an image that is not among `labels`."""
    for m in IMAGE_REF.finditer(text):
        if m.group(1) not in labels:
            have = ", ".join(f"IMAGE#{x}" for x in labels) or "none"
            raise InputError(f"{m.group(0)} is not an image of this conversation (images: {have})")


def validate(conversation: Conversation, *, allow_open: bool = True) -> Conversation:
    """Check role order, where images may stand, and that user text names only images already shown.

    Roles: an optional system message, then user and assistant taking turns, starting with the user. With
    `allow_open` the conversation may end on a user message (a prompt awaiting its answer). Returns the
    conversation, so calls can be chained.
    """
    messages = conversation.messages
    if not messages:
        raise InputError("the conversation has no messages")
    start = 1 if messages[0].role == "system" else 0
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InputError(f"message {i}: unknown role {message.role!r}; expected one of {', '.join(ROLES)}")
        expected = "system" if i < start else ("user" if (i - start) % 2 == 0 else "assistant")
        if message.role != expected:
            raise InputError(f"message {i}: expected a {expected} message, got {message.role!r} "
                             "(after an optional system message, user and assistant take turns)")
        for part in message.parts:
            if not isinstance(part, (Text, Image)):
                raise InputError(f"message {i}: unknown part {type(part).__name__}; expected Text or Image")
            if isinstance(part, Image) and message.role != "user":
                raise InputError(f"message {i}: only user messages may hold images, this one is {message.role!r}")
    if len(messages) == start:
        raise InputError("the conversation has a system message but no user message")
    if not allow_open and messages[-1].role != "assistant":
        raise InputError("the conversation must end with an assistant message")
    shown: list[str] = []
    for i, message in enumerate(messages):
        shown += [p.label for p in message.parts if isinstance(p, Image) and p.label is not None]
        if message.role == "user":
            try:
                check_references(to_plain_text(message.parts), shown)
            except InputError as e:
                raise InputError(f"message {i}: {e}") from None
    return conversation


def to_plain_text(parts: Iterable[Part]) -> str:
    """Text parts only: the words a reader sees, without slots."""
    return "".join(p.text for p in parts if isinstance(p, Text))


def renumber(conversation: Conversation) -> Conversation:
    """Rename images to IMAGE#1, IMAGE#2, … in order of first appearance, rewriting every text reference."""
    mapping: dict[str, str] = {}
    for image in conversation.images:
        if image.label is not None:
            mapping[image.label] = str(len(mapping) + 1)

    def rename(part: Part) -> Part:
        if isinstance(part, Image):
            return replace(part, label=mapping.get(part.label, part.label) if part.label is not None else None)
        return Text(IMAGE_REF.sub(lambda m: f"IMAGE#{mapping.get(m.group(1), m.group(1))}", part.text))

    messages = tuple(Message(m.role, tuple(rename(p) for p in m.parts)) for m in conversation.messages)
    return replace(conversation, messages=messages)
