"""Other formats' records read into a `Conversation` and written back: the plain ``<image>`` placeholder form,
SparklesDialogue/SparklesEval JSON (spec §7.1, §7.4), OpenAI chat messages and LLaVA-style JSON.

Pure conversions between Python objects (dicts, lists, strings) and conversations: no file access, no torch.
The SparklesChat markup (``IMAGE#k<Img><ImageHere></Img>``) is `conversation.parse_markup` / `to_markup`. Each
writer says what the target format cannot hold (see `losses`): as a warning, as an error, or not at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from .conversation import PLACEHOLDER, Conversation, Image, Message, Part, Text, parse_markup, to_markup
from .errors import InputError

OnLoss = Literal["warn", "error", "ignore"]
FORMATS = ("placeholder", "sparkles", "openai", "llava")
# What a reader leaves in `Conversation.meta` for its own format's writer to rebuild the record key for key:
# {"format", "key_order" (when the writer's own order would differ), "message_extras" (the keys each message has
# beside its role and text)}. Present only when needed; other formats' writers ignore it, and no writer copies it.
LAYOUT = "_layout"


class FormatLossWarning(UserWarning):
    """A writer dropped or changed something that the target format cannot hold."""


# The plain <image> placeholder form (LLaVA, Hugging Face processors)


def from_placeholder_text(text: str, images: Sequence[Image] = (), *, offset: int = 0) -> tuple[Part, ...]:
    """Split text with one ``<image>`` per image into parts; the images are named offset+1, offset+2, …

    `images` supplies what is known of each image (source, caption…) in order; their labels are replaced.
    """
    pieces = text.split(PLACEHOLDER)
    if images and len(images) != len(pieces) - 1:
        raise InputError(f"{PLACEHOLDER} placeholders in the text: {len(pieces) - 1}, images given: {len(images)}")
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append(replace(images[i - 1] if images else Image(), label=str(offset + i)))
        if piece:
            parts.append(Text(piece))
    return tuple(parts)


def to_placeholder_text(parts: Iterable[Part], *, offset: int = 0, on_loss: OnLoss = "warn") -> str:
    """Write each image as ``<image>``. Only names are lost: the images themselves travel beside the text."""
    parts = tuple(parts)
    _report("to_placeholder_text", _label_losses(_slots(parts), "the placeholder form", offset), on_loss)
    return "".join(p.text if isinstance(p, Text) else PLACEHOLDER for p in parts)


# SparklesDialogue / SparklesEval JSON


def from_sparkles_dialogue(record: Mapping[str, Any]) -> Conversation:
    """A SparklesDialogue or SparklesEval item as a conversation.

    Each slot of a user message takes the next entry of that message's `images` ({image_id, caption}); its label
    is the one the text writes before the slot. Every key besides `dialogue` goes to `meta` unchanged.
    """
    messages, extras = [], []
    for i, msg in enumerate(_messages_of(record, "dialogue", "SparklesDialogue")):
        where = f"dialogue[{i}]"
        role = _field(msg, "role", where)
        if role not in ("user", "assistant"):
            raise InputError(f"{where}: role must be 'user' or 'assistant', got {role!r}")
        images = _field(msg, "images", where, list, [])
        images = [_sparkles_image(x, f"{where}.images[{j}]") for j, x in enumerate(images)]
        content = _field(msg, "content", where)
        slots = _slots(parse_markup(content))
        if len(slots) != len(images):
            raise InputError(f"{where}: the content has {len(slots)} image slots but 'images' lists {len(images)} "
                             "images; each IMAGE#<id><Img><ImageHere></Img> needs one {image_id, caption}, in order")
        if slots and role != "user":
            raise InputError(f"{where}: only user messages may show images, this one is {role!r}")
        messages.append(Message(role, parse_markup(content, images)))
        # An explicit empty `images` is kept so that the record comes back key for key.
        extras.append({k: v for k, v in msg.items() if k not in ("role", "content", "images") or v == []})
    return Conversation(tuple(messages), _meta("sparkles", record, ("dialogue",), extras=extras))


def _sparkles_image(item: Any, where: str) -> Image:
    if not isinstance(item, Mapping) or "image_id" not in item:
        raise InputError(f"{where}: expected {{'image_id': …, 'caption': …}}, got {item!r:.80}")
    unknown = set(item) - {"image_id", "caption"}
    if unknown:
        raise InputError(f"{where}: unexpected keys {sorted(unknown)}; an image holds only image_id and caption")
    image_id, caption = item["image_id"], item.get("caption")
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or type(caption) not in (str, type(None)):
        raise InputError(f"{where}: image_id must be an int or a string and caption a string, got {item!r:.80}")
    return Image(label=str(image_id), image_id=image_id, caption=caption)


def to_sparkles_dialogue(conv: Conversation, *, on_loss: OnLoss = "warn") -> dict[str, Any]:
    """The inverse of `from_sparkles_dialogue`; `images` lists, per user message, its slots' ids and captions."""
    _report("to_sparkles_dialogue", losses(conv, "sparkles"), on_loss)
    dialogue = []
    for i, m in enumerate(conv.messages):
        if m.role == "system":
            continue
        msg: dict[str, Any] = {"role": m.role, "content": to_markup(m.parts)}
        if m.images:
            msg["images"] = [_sparkles_image_dict(image) for image in m.images]
        dialogue.append(msg | _extras(conv, "sparkles", i))
    return _record(conv, "sparkles", {"dialogue": dialogue})


def _sparkles_image_dict(image: Image) -> dict[str, Any]:
    image_id = image.image_id if image.image_id is not None else image.label
    if image_id is None:
        raise InputError("an unnamed image without an image_id cannot be written as SparklesDialogue: "
                         "give it a label or an image_id")
    return {"image_id": image_id} | ({"caption": image.caption} if image.caption is not None else {})


# OpenAI chat messages

_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_TYPES = ("text", "input_text", "output_text")
_IMAGE_TYPES = ("image_url", "input_image")


def from_openai(messages: Sequence[Mapping[str, Any]]) -> Conversation:
    """OpenAI chat messages as a conversation; images are named 1, 2, … in order across the conversation."""
    if not isinstance(messages, list):
        raise InputError(f"OpenAI messages must be a list of message objects, got {type(messages).__name__}")
    out, extras = [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = _field(msg, "role", where)
        if role not in _OPENAI_ROLES:
            raise InputError(f"{where}: role {role!r} is not supported; expected system, developer, user or "
                             "assistant (tool and function calls have no place here)")
        calls = [k for k in ("tool_calls", "function_call") if msg.get(k)]
        if calls:
            raise InputError(f"{where}: {calls[0]} is not supported; only text and images are")
        parts = _openai_parts(msg.get("content"), where, offset=sum(len(m.images) for m in out))
        if _slots(parts) and role != "user":
            raise InputError(f"{where}: only user messages may show images, this one is {role!r}")
        out.append(Message(_OPENAI_ROLES[role], parts))
        extras.append({k: v for k, v in msg.items() if k not in ("role", "content")})
    return Conversation(tuple(out), _meta("openai", {}, (), extras=extras))


def _openai_parts(content: Any, where: str, offset: int) -> tuple[Part, ...]:
    if content is None or isinstance(content, str):
        return (Text(content),) if content else ()
    if not isinstance(content, list):
        raise InputError(f"{where}.content must be a string, a list of parts or null, got {type(content).__name__}")
    parts: list[Part] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind in _TEXT_TYPES:
            text = _field(part, "text", f"{where}.content[{j}]")
            parts.extend([Text(text)] if text else [])
        elif kind in _IMAGE_TYPES:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str) or not url:
                raise InputError(f"{where}.content[{j}]: image_url.url must be a URL string, got {part!r:.50}")
            parts.append(Image(label=str(offset + len(_slots(parts)) + 1), source=url))
        else:
            raise InputError(f"{where}.content[{j}]: unknown part type {kind!r}; expected text or image_url")
    return tuple(parts)


def to_openai(conv: Conversation, *, image_url: Callable[[Image], str] | None = None,
              on_loss: OnLoss = "warn") -> list[dict[str, Any]]:
    """OpenAI chat messages: content is a string when a message is only text, else a list of parts.

    An image's URL is its `source` when that is an http(s) or data: URL, else `image_url(image)` (for example a
    data URI of its pixels); an image with neither is an `InputError`.
    """
    _report("to_openai", losses(conv, "openai"), on_loss)
    out = []
    for i, m in enumerate(conv.messages):
        content: Any = [_openai_part(p, image_url) for p in m.parts]
        if all(c["type"] == "text" for c in content):
            content = "".join(c["text"] for c in content)
        out.append({"role": m.role, "content": content} | _extras(conv, "openai", i))
    return out


def _openai_part(part: Part, image_url: Callable[[Image], str] | None) -> dict[str, Any]:
    if isinstance(part, Text):
        return {"type": "text", "text": part.text}
    url = part.source if _is_url(part.source) else image_url(part) if image_url else None
    if not _is_url(url):
        raise InputError(f"{part.name} has no URL (source {part.source!r}): OpenAI messages need an http(s) or "
                         "data: URL; pass image_url= to make one, e.g. a data URI of the pixels")
    return {"type": "image_url", "image_url": {"url": url}}


def _is_url(s: Any) -> bool:
    return isinstance(s, str) and s.startswith(("http://", "https://", "data:"))


# LLaVA-style JSON

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_LLAVA_FROM = {v: k for k, v in _LLAVA_ROLES.items()}


def from_llava(record: Mapping[str, Any]) -> Conversation:
    """A LLaVA record: the k-th ``<image>`` of the whole conversation shows the k-th path of `image`.

    A record with images but no ``<image>`` shows them at the start of its first human turn, as LLaVA does.
    Every key besides `image` and `conversations` (`id`…) goes to `meta` unchanged.
    """
    turns = _messages_of(record, "conversations", "LLaVA")
    roles, values = [], []
    for i, turn in enumerate(turns):
        who = _field(turn, "from", f"conversations[{i}]")
        if who not in _LLAVA_ROLES:
            raise InputError(f"conversations[{i}]: 'from' must be human, gpt or system, got {who!r}")
        roles.append(_LLAVA_ROLES[who])
        values.append(_field(turn, "value", f"conversations[{i}]"))
    images = [Image(source=path) for path in _llava_paths(record)]
    tokens = sum(v.count(PLACEHOLDER) for v in values)
    if tokens and tokens != len(images):
        raise InputError(f"the LLaVA record has {tokens} {PLACEHOLDER} tokens but {len(images)} images; "
                         f"use one {PLACEHOLDER} per image, in order, or none to show them all at the start")
    if images and not tokens:
        if "user" not in roles:
            raise InputError("the LLaVA record has images but no human turn to show them in")
        first = roles.index("user")
        values[first] = PLACEHOLDER * len(images) + values[first]
    messages, k = [], 0
    for i, (role, value) in enumerate(zip(roles, values, strict=True)):
        n = value.count(PLACEHOLDER)
        if n and role != "user":
            raise InputError(f"conversations[{i}]: only human turns may show images, this one is {_LLAVA_FROM[role]}")
        messages.append(Message(role, from_placeholder_text(value, images[k : k + n], offset=k)))
        k += n
    extras = [{key: v for key, v in t.items() if key not in ("from", "value")} for t in turns]
    return Conversation(tuple(messages), _meta("llava", record, ("image", "conversations"), ("id",), extras))


def _llava_paths(record: Mapping[str, Any]) -> list[str]:
    image = record.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise InputError(f"LLaVA 'image' must be a path or a list of paths, got {image!r:.80}")
    return paths


def to_llava(conv: Conversation, *, image_path: Callable[[Image], str] | None = None,
             on_loss: OnLoss = "warn") -> dict[str, Any]:
    """A LLaVA record: `image` is one path, a list of paths, or absent; each image is ``<image>`` in the text.

    An image's path is its `source`, or `image_path(image)` when it has none or has a data: URI.
    """
    _report("to_llava", losses(conv, "llava"), on_loss)
    paths = [_llava_path(image, image_path) for image in conv.slots]
    own: dict[str, Any] = {"image": paths[0] if len(paths) == 1 else paths} if paths else {}
    own["conversations"] = [{"from": _LLAVA_FROM[m.role], "value": to_placeholder_text(m.parts, on_loss="ignore")}
                            | _extras(conv, "llava", i) for i, m in enumerate(conv.messages)]
    return _record(conv, "llava", own, ("id",))


def _llava_path(image: Image, image_path: Callable[[Image], str] | None) -> str:
    if image.source is not None and not image.source.startswith("data:"):
        return image.source
    if image_path is None:
        raise InputError(f"{image.name} has no path: LLaVA records name image files; pass image_path=, "
                         "e.g. lambda image: f'{image.image_id}.jpg'")
    return image_path(image)


# What a format loses, and telling the caller

_WHERE = {"placeholder": "the placeholder form", "sparkles": "SparklesDialogue", "openai": "OpenAI messages",
          "llava": "LLaVA records"}


def losses(conv: Conversation, fmt: str) -> list[str]:
    """What writing `conv` in `fmt` (placeholder, sparkles, openai, llava) drops or changes; empty if nothing."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    where = _WHERE[fmt]
    if fmt == "sparkles":  # labels live on in the text, ids and captions in `images`
        out = _dropped(sum(m.role == "system" for m in conv.messages), "system message", f"{where} has no system role")
        out += _dropped(sum(i.source is not None or i.pixels is not None for i in conv.images), "image source",
                        f"{where} holds image ids and captions only")
        unnamed = [i.name for i in conv.images if i.image_id is None and i.label is not None]
        return out + ([f"{', '.join(unnamed)} {'has' if len(unnamed) == 1 else 'have'} no image_id: "
                       "the label is written as the id"] if unnamed else [])
    out = _label_losses(conv.slots, where)
    if fmt == "placeholder":  # the images travel beside the text, so only their names are at stake
        return out
    for attr, noun in (("caption", "image caption"), ("image_id", "image id")):
        out += _dropped(sum(getattr(i, attr) is not None for i in conv.images), noun, f"no place in {where}")
    fields = [k for k in conv.meta if k != LAYOUT]
    if fmt == "openai" and fields:
        out.append(f"record fields {', '.join(fields)} are dropped (OpenAI messages are a bare list)")
    return out


def _label_losses(slots: Sequence[Image], where: str, offset: int = 0) -> list[str]:
    """Formats without names call the k-th image slot IMAGE#k; say which names that changes."""
    out, seen = [], set()
    for k, image in enumerate(slots, start=offset + 1):
        if image.label in seen:
            out.append(f"{image.name} is shown twice (in {where} each slot is a new image: it reads back as IMAGE#{k})")
        elif image.label not in (None, str(k)):
            out.append(f"{image.name} will read back as IMAGE#{k} (in {where} images are numbered by position; "
                       "renumber() first to make the text match)")
        seen.add(image.label)
    return out


def _dropped(n: int, noun: str, why: str) -> list[str]:
    return [f"the {noun} is dropped ({why})" if n == 1 else f"{n} {noun}s are dropped ({why})"] if n else []


def _report(writer: str, lost: list[str], on_loss: OnLoss) -> None:
    if on_loss not in ("warn", "error", "ignore"):
        raise InputError(f"on_loss must be 'warn', 'error' or 'ignore', got {on_loss!r}")
    if not lost or on_loss == "ignore":
        return
    text = f"{writer} loses: " + "; ".join(lost)
    if on_loss == "error":
        raise InputError(text + " (pass on_loss='warn' or 'ignore' to write anyway)")
    warnings.warn(FormatLossWarning(text), stacklevel=3)


# Records: messages, meta and bookkeeping


def _messages_of(record: Any, key: str, fmt: str) -> list[Mapping[str, Any]]:
    if not isinstance(record, Mapping):
        raise InputError(f"a {fmt} record must be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise InputError(f"a {fmt} record needs a {key!r} list of messages; it has only: {', '.join(record) or '{}'}")
    messages = record[key]
    if not isinstance(messages, list):
        raise InputError(f"{fmt} {key!r} must be a list of messages, got {type(messages).__name__}")
    return messages


def _field(msg: Any, key: str, where: str, kind: type = str, default: Any = ...) -> Any:
    if not isinstance(msg, Mapping):
        raise InputError(f"{where}: expected a message object, got {type(msg).__name__}")
    if key not in msg:
        if default is not ...:
            return default
        raise InputError(f"{where}: missing {key!r} (it has: {', '.join(msg) or 'nothing'})")
    if not isinstance(msg[key], kind):
        raise InputError(f"{where}.{key} must be a {kind.__name__}, got {type(msg[key]).__name__}")
    return msg[key]


def _meta(fmt: str, record: Mapping[str, Any], own: Sequence[str], lead: Sequence[str] = (),
          extras: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The record's other fields, plus the layout that `fmt`'s writer needs to rebuild it key for key."""
    meta = {k: v for k, v in record.items() if k not in own}
    first = [k for k in lead if k in meta]
    layout: dict[str, Any] = {"format": fmt}
    if list(record) != first + [k for k in own if k in record] + [k for k in meta if k not in first]:
        layout["key_order"] = list(record)
    if any(extras):
        layout["message_extras"] = [dict(e) for e in extras]
    return meta | ({LAYOUT: layout} if len(layout) > 1 else {})


def _layout(conv: Conversation, fmt: str, key: str) -> Any:
    layout = conv.meta.get(LAYOUT) or {}
    return layout.get(key, ()) if layout.get("format") == fmt else ()


def _record(conv: Conversation, fmt: str, own: dict[str, Any], lead: Sequence[str] = ()) -> dict[str, Any]:
    """`lead` meta fields, the format's own fields, the other meta fields; or the order the source record had."""
    meta = {k: v for k, v in conv.meta.items() if k != LAYOUT}
    out = {k: meta[k] for k in lead if k in meta} | own
    out |= {k: v for k, v in meta.items() if k not in out}
    order = [k for k in _layout(conv, fmt, "key_order") if k in out]
    return {k: out[k] for k in order} | out


def _extras(conv: Conversation, fmt: str, i: int) -> dict[str, Any]:
    extras = _layout(conv, fmt, "message_extras")
    return dict(extras[i]) if i < len(extras) else {}


def _slots(parts: Iterable[Part]) -> list[Image]:
    return [p for p in parts if isinstance(p, Image)]

